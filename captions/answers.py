"""What a chat completion says, and whether to trust it: parsing, refusals, absurd captions, and
the tokens of a paid answer whose body is broken.

A server's 200 is not proof of a caption. ``parse_completion`` turns any body shape (SDK object,
plain dict from a batch output line) into an ``Answer`` or raises ``MalformedResponse``;
``screen`` flags an answer far longer than ``--max-tokens`` could produce (a runaway or hostile
server) as invalid, keeping a short note instead of the text, so it is never used as a caption
nor stored whole; ``usage_in_body`` reads the token counts out of a truncated body, so a broken
answer that was paid for still counts in the cost summary.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

REFUSAL_PHRASES: tuple[str, ...] = (
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i can't help",
    "i cannot help",
    "i can't assist",
    "i cannot assist",
    "i can't provide",
    "i cannot provide",
    "unable to provide",
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
    "i am not able to",
    "i can't analyze",
    "i cannot analyze",
    "i can't interpret",
    "i cannot interpret",
)
# The longest caption ``--max-tokens N`` can produce: N tokens of CHARS_PER_TOKEN_MAX characters
# (English runs ~4 per token; 8 leaves room for long medical words), and never under MIN_LIMIT.
CHARS_PER_TOKEN_MAX = 8
MIN_LIMIT = 1000
INVALID = "invalid_length"  # the finish_reason recorded for a screened-out answer
_USAGE = {name: re.compile(rf'"{name}"\s*:\s*(\d+)') for name in ("prompt_tokens", "completion_tokens")}


class MalformedResponse(Exception):
    """A 2xx answer whose body is not a usable chat completion (retried a bounded number of times).

    ``body`` holds the start of what came back (for ``usage_in_body``), when there was one.
    """

    def __init__(self, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.body = body


@dataclass(frozen=True)
class Answer:
    """One parsed chat completion."""

    text: str
    finish_reason: str | None
    refused: bool
    prompt_tokens: int
    completion_tokens: int
    request_id: str | None
    model: str | None
    usage: str = "reported"  # "estimated" when the server sent no usage (jobs.with_estimated_usage)

    @property
    def truncated(self) -> bool:
        """Empty and cut by the completion cap: a reasoning model spent it all on reasoning."""
        return self.finish_reason == "length" and not self.text.strip()

    @property
    def invalid(self) -> bool:
        """Screened out by ``screen`` (far longer than the completion cap allows)."""
        return self.finish_reason == INVALID


def detect_refusal(text: str, finish_reason: str | None, refusal: str | None = None) -> bool:
    """True for refusals, empty answers and truncated or filtered completions."""
    if refusal or finish_reason in ("length", "content_filter") or not text.strip():
        return True
    head = text.strip().lower().replace("\u2019", "'")[:300]
    return any(phrase in head for phrase in REFUSAL_PHRASES)


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def parse_completion(completion: Any) -> Answer:
    """Answer from a ChatCompletion (SDK object or plain dict, as in batch output files).

    Raises:
        MalformedResponse: anything that is not a chat completion with a choice.
    """
    if hasattr(completion, "model_dump"):
        request_id = getattr(completion, "_request_id", None)
        completion = completion.model_dump()
        completion["_request_id"] = request_id
    try:
        choices = completion.get("choices") if isinstance(completion, dict) else None
        if not isinstance(choices, list) or not choices:
            raise MalformedResponse("response has no choices")
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content, refusal = message.get("content"), message.get("refusal")
        if content is not None and not isinstance(content, str):
            raise MalformedResponse("message content is not text")
        text = (content or "").strip()
        refusal = refusal if isinstance(refusal, str) else None
        finish = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
        usage = completion.get("usage") if isinstance(completion.get("usage"), dict) else {}
        request_id = completion.get("_request_id") or completion.get("id")
        model = completion.get("model")
        return Answer(
            text=text or (refusal or ""),
            finish_reason=finish,
            refused=detect_refusal(text, finish, refusal),
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            request_id=request_id if isinstance(request_id, str) else None,
            model=model if isinstance(model, str) else None,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise MalformedResponse(f"response is not a chat completion: {type(exc).__name__}") from None


def caption_limit(max_tokens: int | None) -> int:
    """The most characters a caption of ``max_tokens`` completion tokens can plausibly hold."""
    return max(MIN_LIMIT, CHARS_PER_TOKEN_MAX * int(max_tokens or 0))


def screen(answer: Answer, max_tokens: int | None) -> tuple[Answer, str | None]:
    """``answer`` unchanged, or flagged invalid (refused, a short note for text) with one line.

    Args:
        max_tokens: the caption's ``--max-tokens`` (the limit is ``caption_limit`` of it).
    """
    limit = caption_limit(max_tokens)
    if len(answer.text) <= limit:
        return answer, None
    line = (f"caption of {len(answer.text):,} characters, over the {limit:,} that --max-tokens "
            f"{max_tokens} allows: flagged invalid, not used")
    return replace(answer, text=f"[invalid answer: {line}]", refused=True, finish_reason=INVALID), line


def usage_in_body(body: bytes | None) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) read from a broken JSON body, when both are there."""
    if not body:
        return None
    text = body[:1_000_000].decode("utf-8", "replace")
    found = [_USAGE[name].search(text) for name in ("prompt_tokens", "completion_tokens")]
    if not all(found):
        return None
    return int(found[0].group(1)), int(found[1].group(1))  # type: ignore[union-attr]


def looks_paid(body: bytes | None) -> bool:
    """A 200 body that is a cut-off JSON object, or a whole one with ``choices``: the model ran,
    so the request was billed (a whole JSON error or a proxy's HTML page was not)."""
    if not body or body.lstrip()[:1] != b"{":
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return True
    return isinstance(data, dict) and "choices" in data
