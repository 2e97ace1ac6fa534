"""OpenAI-compatible async caption client: one retry layer, bounded concurrency, rate limits.

The SDK's own retries are off (``max_retries=0``); tenacity is the only retry layer. It retries
429 rate limits, 5xx, 408/409, timeouts, connection errors and malformed bodies with
exponential backoff and jitter, and waits exactly what the server asks when it says so
(``retry-after-ms``, ``retry-after``, "Please try again in 1.5s"). 400/401/403/404 and
``insufficient_quota`` are never retried: they raise ``FatalAPIError``, one line, key redacted,
and the caller stops the run. A 429 also pauses every worker (shared cooldown), so a rate-limited
server is not hammered by the other workers.
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
from captions.options import RetryPolicy

log = logging.getLogger(__name__)

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


_DURATION = re.compile(
    r"(\d+(?:\.\d+)?)\s*(milliseconds?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|h)(?![a-z])",
    re.I,
)


def _parse_duration(text: str) -> float | None:
    """Seconds in "1.5s", "20ms", "6m0s", "2 seconds"; None when there is no duration."""
    total, found = 0.0, False
    for number, unit in _DURATION.findall(text):
        unit = unit.lower()
        if unit == "ms" or unit.startswith("milli"):
            scale = 1e-3
        elif unit.startswith("s"):
            scale = 1.0
        elif unit.startswith("m"):
            scale = 60.0
        else:
            scale = 3600.0
        total += float(number) * scale
        found = True
    return total if found else None


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
    return _parse_duration(match.group(1)) if match else None


def _error_code(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(exc.code or body.get("code") or exc.type or body.get("type") or "")


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


def fatal_error(exc: openai.APIStatusError, secret: str | None) -> FatalAPIError:
    """One-line, key-free error for a non-retryable status."""
    code = _error_code(exc)
    hint = {
        401: "check OPENAI_API_KEY",
        403: "the key has no access to this model or endpoint",
        404: "check --model and --base-url",
    }.get(exc.status_code, "")
    if is_quota_error(exc):
        hint = "the account is out of quota; check plan and billing"
    message = redact(getattr(exc, "message", "") or "", secret)
    text = f"caption API error {exc.status_code}" + (f" ({code})" if code else "") + f": {message}"
    return FatalAPIError(redact(text + (f" -- {hint}" if hint else ""), secret))


def completion_params(model: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """Generation kwargs; reasoning models take max_completion_tokens and no temperature."""
    if re.match(r"^(o\d|gpt-5)", model.rsplit("/", 1)[-1]):
        return {"max_completion_tokens": max_tokens}
    return {"max_tokens": max_tokens, "temperature": temperature}


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


async def call_with_retry(fn: Any, policy: RetryPolicy, secret: str | None) -> Any:
    """Await ``fn()`` under the retry policy; non-retryable statuses become FatalAPIError.

    For the small Batch API calls (upload, create, retrieve, download).
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
        raise fatal_error(exc, secret) from None
    raise AssertionError("unreachable")


class RateLimiter:
    """Token bucket refilled at ``per_minute / 60`` units per second; bursts up to 1 s.

    A request costing more than the burst waits for a full bucket and leaves it in debt, so
    the long-run rate still holds. ``per_minute=None`` disables the limit.
    """

    def __init__(self, per_minute: float | None) -> None:
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = max(1.0, self.rate or 1.0)
        # Start nearly empty: a full bucket would let rate + capacity requests into the first
        # minute, which a strict server counting a sliding 60 s window answers with 429s.
        self.level = 1.0
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()  # FIFO among waiters

    async def acquire(self, cost: float = 1.0) -> None:
        if self.rate is None:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
                self.updated = now
                need = min(cost, self.capacity)
                if self.level >= need:
                    self.level -= cost
                    return
                await asyncio.sleep((need - self.level) / self.rate)


class CaptionClient:
    """Sends chat completions for captions; create and use inside one event loop."""

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
    ) -> None:
        self.model = model
        self.retry = retry or RetryPolicy()
        self.openai = make_openai(api_key, base_url, timeout)
        self._secret = api_key
        self._sem = asyncio.Semaphore(max(1, concurrency))
        self._rpm = RateLimiter(rpm)
        self._tpm = RateLimiter(tpm)
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
        """One caption with retries. Raises FatalAPIError, Stopped or the last retryable error."""
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
                completion = await self.openai.post(
                    "/chat/completions", cast_to=ChatCompletion,
                    body={"model": self.model, "messages": messages,
                          **completion_params(self.model, max_tokens, temperature)},
                )
            except (json.JSONDecodeError, ValueError) as exc:  # body that is not JSON
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
