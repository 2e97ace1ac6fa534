"""OpenAI-compatible async caption client: one retry layer, bounded concurrency, rate limits.

The SDK's own retries are off (``max_retries=0``); tenacity is the only retry layer. It retries
429 rate limits, 5xx, 408/409, timeouts, connection errors and malformed bodies with
exponential backoff and jitter, and waits exactly what the server asks when it says so
(``retry-after-ms``, ``retry-after``, "Please try again in 1.5s"). 400/401/403/404 and
``insufficient_quota`` are never retried: they raise ``FatalAPIError``, one line, key redacted,
and the caller stops the run. A 429 also pauses every worker (shared cooldown), so a rate-limited
server is not hammered by the other workers. Without ``--rpm``/``--tpm`` the client paces itself
from the service's ``x-ratelimit-*`` headers (limit -> rate; remaining nearly spent -> wait for
the reset), so a run sees few 429s. Error bodies of OpenAI and of open-model servers (vLLM,
SGLang, Ollama, LMDeploy, FastAPI ``detail``) become one line with a hint where one helps.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from captions.errors import FatalAPIError
from captions.models import completion_params
from captions.options import RetryPolicy
from captions.pacing import HeaderPacer, RateLimiter, parse_duration

log = logging.getLogger(__name__)
RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"  # the SDK's switch for a response with headers

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
# 400s that concern one image, not the run: flagged like a refusal instead of stopping.
CONTENT_ERROR_CODES = ("content_policy_violation", "content_filter", "image_content_policy_violation")


class MalformedResponse(Exception):
    """A 2xx answer whose body is not a usable chat completion (retried)."""


class Stopped(Exception):
    """The run is stopping (another worker hit a fatal error); nothing was sent."""


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


def redact(text: str, secret: str | None = None) -> str:
    """Remove an API key (exact and ``sk-...``/Bearer patterns) from a message; one line."""
    if secret:
        text = text.replace(secret, "***")
    text = re.sub(r"sk-[A-Za-z0-9_\-*.]{4,}", "sk-***", text)
    text = re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)
    return " ".join(text.split())[:400]


def detect_refusal(text: str, finish_reason: str | None, refusal: str | None = None) -> bool:
    """True for refusals, empty answers and truncated or filtered completions."""
    if refusal or finish_reason in ("length", "content_filter") or not text.strip():
        return True
    head = text.strip().lower().replace("\u2019", "'")[:300]
    return any(phrase in head for phrase in REFUSAL_PHRASES)


def retry_after_hint(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait, from headers or the error message."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            value = headers.get(name)
            if value is None:
                continue
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                parsed = email.utils.parsedate_to_datetime(value) if scale == 1.0 else None
                if parsed is not None:
                    return max(0.0, parsed.timestamp() - time.time())
    message = getattr(exc, "message", None) or str(exc)
    match = re.search(r"try again in\s+(\d[\d.]*\s*[a-z]+(?:\d[\d.]*[a-z]+)*)", message, re.I)
    return parse_duration(match.group(1)) if match else None


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    for value in (exc.code, body.get("code"), exc.type, body.get("type")):
        if isinstance(value, str) and value:
            return value  # vLLM and SGLang put the HTTP status (an int) in "code"
    return ""


def server_message(exc: openai.APIStatusError) -> str:
    """The server's own words, from any of the error body shapes servers send: OpenAI
    ``{"error": {"message"}}``, vLLM/SGLang/LMDeploy ``{"object": "error", "message"}``, Ollama
    ``{"error": "..."}``, FastAPI ``{"detail": "..." | [{"msg"}]}``, or plain text."""
    body = exc.body
    if isinstance(body, str) and body.strip():
        return body
    if isinstance(body, dict):
        for key in ("message", "error", "detail", "msg"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"]
            if isinstance(value, list) and value:
                return "; ".join(str(v.get("msg", v)) if isinstance(v, dict) else str(v) for v in value)
    message = getattr(exc, "message", "") or ""
    return re.sub(r"^Error code: \d+( - )?", "", message) or f"HTTP {exc.status_code}"


def is_quota_error(exc: BaseException) -> bool:
    if not isinstance(exc, openai.APIStatusError):
        return False
    code = _error_code(exc)
    return "insufficient_quota" in code or "billing" in code or "exceeded your current quota" in str(exc)


def is_retryable(exc: BaseException) -> bool:
    """The single retry predicate (see module docstring)."""
    if isinstance(exc, (MalformedResponse, openai.APIConnectionError, openai.APIResponseValidationError)):
        return True  # APITimeoutError is an APIConnectionError
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            return not is_quota_error(exc)
        return status >= 500 or status in (408, 409)
    return False


_CONTEXT_WORDS = ("context length", "context_length", "context window", "maximum context", "prompt is too long",
                  "too many tokens", "exceeds the model")


def _hint(exc: openai.APIStatusError, code: str, message: str) -> str:
    text = f"{code} {message}".lower()
    if is_quota_error(exc):
        return "the account is out of quota; check plan and billing"
    if any(w in text for w in _CONTEXT_WORDS):
        return ("the image and prompt do not fit the model's context window: pass a smaller --image-size "
                "(fewer image tokens) or --max-tokens, or serve the model with a longer context "
                "(vLLM: --max-model-len)")
    if "reasoning_effort" in text or "reasoning effort" in text:
        return "this model does not take --reasoning-effort, or not this value"
    return {
        401: "check OPENAI_API_KEY",
        403: "the key has no access to this model or endpoint",
        404: "check --model (the name the server serves) and --base-url (it usually ends in /v1)",
    }.get(exc.status_code, "")


def fatal_error(exc: openai.APIStatusError, secret: str | None) -> FatalAPIError:
    """One-line, key-free error for a non-retryable status."""
    code = _error_code(exc)
    message = redact(server_message(exc), secret)
    hint = _hint(exc, code, message)
    text = f"caption API error {exc.status_code}" + (f" ({code})" if code else "") + f": {message}"
    return FatalAPIError(redact(text + (f" -- {hint}" if hint else ""), secret))


def make_openai(api_key: str, base_url: str | None, timeout: float) -> openai.AsyncOpenAI:
    """The SDK client with its own retries off (tenacity is the one retry layer)."""
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)


def backoff_wait(policy: RetryPolicy, attempt_number: int, exc: BaseException | None) -> float:
    """Server-requested wait (plus up to 10% jitter) if any, else exponential with jitter."""
    hint = retry_after_hint(exc) if exc is not None else None
    if hint is not None:
        return min(hint, policy.max_hint_s) * random.uniform(1.0, 1.1)
    base = min(policy.max_wait_s, policy.initial_s * 2 ** (attempt_number - 1))
    return base / 2 + random.uniform(0, base / 2)


class EndpointMissing(FatalAPIError):
    """The server does not have the endpoint (404/405): e.g. no Files/Batches API."""


async def call_with_retry(fn: Any, policy: RetryPolicy, secret: str | None, missing: str | None = None) -> Any:
    """Await ``fn()`` under the retry policy; non-retryable statuses become FatalAPIError.

    For the small Batch API calls (upload, create, retrieve, download).

    Args:
        missing: when set, a 404/405 raises ``EndpointMissing`` with this line instead.
    """
    retrying = AsyncRetrying(
        retry=retry_if_exception(is_retryable),
        wait=lambda s: backoff_wait(policy, s.attempt_number, s.outcome.exception()),
        stop=stop_after_attempt(policy.max_attempts),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                try:
                    return await fn()
                except (json.JSONDecodeError, ValueError):
                    raise MalformedResponse("unparseable response") from None
    except openai.APIStatusError as exc:
        if is_retryable(exc):
            raise
        if missing is not None and exc.status_code in (404, 405):
            raise EndpointMissing(missing) from None
        raise fatal_error(exc, secret) from None
    raise AssertionError("unreachable")


class CaptionClient:
    """Sends chat completions for captions; create and use inside one event loop.

    ``rpm``/``tpm`` None: paced from the server's x-ratelimit-* headers (``HeaderPacer``).
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model: str,
        timeout: float = 60.0,
        concurrency: int = 8,
        rpm: float | None = None,
        tpm: float | None = None,
        retry: RetryPolicy | None = None,
        reasoning_effort: str | None = None,
    ) -> None:
        self.model = model
        self.reasoning_effort = reasoning_effort
        self.retry = retry or RetryPolicy()
        self.openai = make_openai(api_key, base_url, timeout)
        self._secret = api_key
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self._rpm = RateLimiter(rpm)
        self._tpm = RateLimiter(tpm)
        self.pacer = HeaderPacer(self._rpm, self._tpm, paced_requests=rpm is None, paced_tokens=tpm is None,
                                 concurrency=max(1, concurrency))
        self._cooldown_until = 0.0
        self._stopped = False
        self.attempts = 0  # HTTP requests sent, retries included

    def stop(self) -> None:
        """Send nothing more (in-flight requests finish)."""
        self._stopped = True

    async def aclose(self) -> None:
        await self.openai.close()

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        wait = backoff_wait(self.retry, state.attempt_number, exc)
        if isinstance(exc, openai.RateLimitError):
            self._cooldown_until = max(self._cooldown_until, time.monotonic() + wait)
        return wait

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        status = getattr(exc, "status_code", type(exc).__name__)
        wait = state.next_action.sleep if state.next_action else 0.0
        log.info("retrying caption request after %s (attempt %d, waiting %.2fs): %s",
                 status, state.attempt_number, wait, redact(str(exc), self._secret)[:160])

    async def complete(
        self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float, est_tokens: int
    ) -> Answer:
        """One caption with retries. Raises FatalAPIError, Stopped or the last retryable error.

        Args:
            max_tokens: the completion cap (for a reasoning model: reasoning plus caption).
        """
        retrying = AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            wait=self._wait,
            stop=stop_after_attempt(self.retry.max_attempts),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(messages, max_tokens, temperature, est_tokens)
        except openai.APIStatusError as exc:
            if is_retryable(exc):
                raise
            if exc.status_code == 400 and _error_code(exc) in CONTENT_ERROR_CODES:
                return Answer(redact(exc.message, self._secret), "content_filter", True, 0, 0,
                              exc.request_id, self.model)
            # `from None`: the SDK error holds the request, whose headers carry the key.
            raise fatal_error(exc, self._secret) from None
        raise AssertionError("unreachable")

    async def _once(
        self, messages: list[dict[str, Any]], max_tokens: int, temperature: float, est_tokens: int
    ) -> Answer:
        async with self._sem:
            while (delay := self._cooldown_until - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            await self._rpm.acquire(1)
            await self._tpm.acquire(est_tokens)
            if self._stopped:
                raise Stopped()
            self.attempts += 1
            try:
                # client.post instead of chat.completions.create: same auth, errors and timeout,
                # minus the SDK's per-request TypedDict transform of the messages, which costs
                # ~5 ms of CPU per image message and halved throughput in our measurements.
                # The raw-response header keeps the rate-limit headers (parsed below).
                raw = await self.openai.post(
                    "/chat/completions", cast_to=ChatCompletion,
                    body={"model": self.model, "messages": messages,
                          **completion_params(self.model, max_tokens, temperature, self.reasoning_effort)},
                    options={"headers": {RAW_RESPONSE_HEADER: "true"}},
                )
                hold = self.pacer.update(raw.headers, est_tokens)
                if hold > 0:
                    self._cooldown_until = max(self._cooldown_until, time.monotonic() + hold)
                completion = raw.parse()
            except (json.JSONDecodeError, ValueError, openai.APIResponseValidationError) as exc:
                raise MalformedResponse(f"unparseable response: {type(exc).__name__}") from None
        return parse_completion(completion)


def parse_completion(completion: Any) -> Answer:
    """Answer from a ChatCompletion (SDK object or plain dict, as in batch output files)."""
    if hasattr(completion, "model_dump"):
        request_id = getattr(completion, "_request_id", None)
        completion = completion.model_dump()
        completion["_request_id"] = request_id
    if not isinstance(completion, dict) or not completion.get("choices"):
        raise MalformedResponse("response has no choices")
    choice = completion["choices"][0] or {}
    message = choice.get("message") or {}
    text = (message.get("content") or "").strip()
    refusal = message.get("refusal")
    finish = choice.get("finish_reason")
    usage = completion.get("usage") or {}
    return Answer(
        text=text or (refusal or ""),
        finish_reason=finish,
        refused=detect_refusal(text, finish, refusal),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        request_id=completion.get("_request_id") or completion.get("id"),
        model=completion.get("model"),
    )
