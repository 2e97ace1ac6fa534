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

A hostile or broken server cannot hold or fool a run: ``--timeout`` bounds each attempt as a
whole (a server that drips one byte a second times out like one that says nothing), a wait the
server asks for beyond ``RetryPolicy.max_hint_s`` is not slept (``RetryLater``: the slice fails
for this run, one line, and is asked again by the next), and a 200 whose body is not a chat
completion is retried only ``RetryPolicy.max_malformed`` times; its tokens still count when
the caller passes ``on_broken`` (``captions.answers``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from tenacity import AsyncRetrying, RetryCallState

from captions.answers import REFUSAL_PHRASES as REFUSAL_PHRASES  # re-exported: callers import them from here
from captions.answers import Answer, MalformedResponse, parse_completion
from captions.answers import detect_refusal as detect_refusal
from captions.errors import FatalAPIError
from captions.models import completion_params
from captions.options import RetryPolicy
from captions.pacing import HeaderPacer, RateLimiter, parse_duration

log = logging.getLogger(__name__)
RAW_RESPONSE_HEADER = "X-Stainless-Raw-Response"  # the SDK's switch for a response with headers

# 400s that concern one image, not the run: flagged like a refusal instead of stopping.
CUT_OFF = b"{"  # what is known of a body the server cut off: a JSON object began (the model ran)
CONTENT_ERROR_CODES = ("content_policy_violation", "content_filter", "image_content_policy_violation")


class Stopped(Exception):
    """The run is stopping (another worker hit a fatal error); nothing was sent."""


def redact(text: str, secret: str | None = None) -> str:
    """Remove an API key (exact and ``sk-...``/Bearer patterns) from a message; one line."""
    if secret:
        text = text.replace(secret, "***")
    text = re.sub(r"sk-[A-Za-z0-9_\-*.]{4,}", "sk-***", text)
    text = re.sub(r"(?i)bearer\s+\S+", "Bearer ***", text)
    return " ".join(text.split())[:400]


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
    if isinstance(exc, (MalformedResponse, AttemptTimeout, openai.APIConnectionError,
                        openai.APIResponseValidationError)):
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


class AttemptTimeout(Exception):
    """One attempt took longer than ``--timeout`` as a whole (retried like a timeout)."""


class RetryLater(Exception):
    """The server asked for a longer wait than ``RetryPolicy.max_hint_s``: not slept; the slice
    fails for this run and is asked again by the next one."""


def backoff_wait(policy: RetryPolicy, attempt_number: int, exc: BaseException | None) -> float:
    """Server-requested wait (plus up to 10% jitter) if any, else exponential with jitter."""
    hint = retry_after_hint(exc) if exc is not None else None
    if hint is not None:
        return min(hint, policy.max_hint_s) * random.uniform(1.0, 1.1)
    base = min(policy.max_wait_s, policy.initial_s * 2 ** (attempt_number - 1))
    return base / 2 + random.uniform(0, base / 2)


def wait_too_long(exc: BaseException, policy: RetryPolicy) -> RetryLater | None:
    """A ``RetryLater`` line when ``exc`` asks for a wait over the policy's cap, else None."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    hint = retry_after_hint(exc)
    if hint is None or hint <= policy.max_hint_s:
        return None
    return RetryLater(f"the server asked to wait {hint:,.0f} s (HTTP {exc.status_code}), more than the "
                      f"{policy.max_hint_s:g} s we wait (--max-retry-wait); not waiting: asked again on the next run")


class _Retrying:
    """The retry and stop rules of one call: ``is_retryable``, no wait over the cap, and at most
    ``max_malformed`` retries of unusable 200s within ``max_attempts``."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.malformed = 0

    def retry(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None or not is_retryable(exc) or wait_too_long(exc, self.policy) is not None:
            return False
        if isinstance(exc, MalformedResponse):
            self.malformed += 1
            return self.malformed <= self.policy.max_malformed
        return True

    def stop(self, state: RetryCallState) -> bool:
        return state.attempt_number >= self.policy.max_attempts

    def give_up(self, exc: BaseException) -> BaseException:
        """What the caller sees once retrying is over (one line)."""
        if isinstance(exc, MalformedResponse):
            return MalformedResponse(f"{self.malformed} answers with status 200 were not a usable chat completion "
                                     f"(last: {exc}); not retried further: asked again on the next run")
        if isinstance(exc, AttemptTimeout):
            return AttemptTimeout(f"{exc}; gave up after {self.policy.max_attempts} attempts")
        return wait_too_long(exc, self.policy) or exc


class EndpointMissing(FatalAPIError):
    """The server does not have the endpoint (404/405): e.g. no Files/Batches API."""


async def call_with_retry(fn: Any, policy: RetryPolicy, secret: str | None, missing: str | None = None,
                          deadline: float | None = None) -> Any:
    """Await ``fn()`` under the retry policy; non-retryable statuses become FatalAPIError.

    For the small Batch API calls (upload, create, retrieve, download).

    Args:
        missing: when set, a 404/405 raises ``EndpointMissing`` with this line instead.
        deadline: seconds one attempt may take as a whole (None: the client's per-read timeout).

    Raises:
        FatalAPIError: a non-retryable status, or a wait over the policy's cap (the batch state
            is saved: the next run goes on from there).
    """
    rules = _Retrying(policy)
    retrying = AsyncRetrying(retry=rules.retry, stop=rules.stop, reraise=True,
                             wait=lambda s: backoff_wait(policy, s.attempt_number, s.outcome.exception()))

    async def once() -> Any:
        try:
            return await (fn() if deadline is None else asyncio.wait_for(fn(), deadline))
        except asyncio.TimeoutError:
            raise AttemptTimeout(f"no complete answer within {deadline:g} s") from None
        except (json.JSONDecodeError, ValueError):
            raise MalformedResponse("unparseable response") from None

    try:
        async for attempt in retrying:
            with attempt:
                return await once()
    except openai.APIStatusError as exc:
        if (later := wait_too_long(exc, policy)) is not None:
            raise FatalAPIError(str(later)) from None
        if missing is not None and exc.status_code in (404, 405):
            raise EndpointMissing(missing) from None
        if not is_retryable(exc):
            raise fatal_error(exc, secret) from None
        raise FatalAPIError(redact(f"the server kept failing ({policy.max_attempts} attempts): "
                                   f"{fatal_error(exc, secret)}", secret)) from None
    except Exception as exc:
        if not is_retryable(exc):
            raise
        # The batch state is saved step by step: the next run goes on from here.
        raise FatalAPIError(redact(f"the server kept failing: {type(exc).__name__}: {rules.give_up(exc)}",
                                   secret)) from None
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
        self.timeout = timeout  # one attempt as a whole, not each read (httpx's timeout)
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
        self, messages: list[dict[str, Any]], *, max_tokens: int, temperature: float, est_tokens: int,
        on_broken: Callable[[bytes | None], None] | None = None,
    ) -> Answer:
        """One caption with retries. Raises FatalAPIError, Stopped, RetryLater or the last
        retryable error (``AttemptTimeout``, ``MalformedResponse``, a status), each one line.

        Args:
            max_tokens: the completion cap (for a reasoning model: reasoning plus caption).
            on_broken: called with the body of each 200 that was not a usable chat completion
                (its tokens may have been paid: ``captions.answers.usage_in_body``).
        """
        rules = _Retrying(self.retry)
        retrying = AsyncRetrying(retry=rules.retry, stop=rules.stop, wait=self._wait,
                                 before_sleep=self._log_retry, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        return await self._once(messages, max_tokens, temperature, est_tokens)
                    except MalformedResponse as exc:
                        if on_broken is not None:
                            on_broken(exc.body)
                        raise
        except openai.APIStatusError as exc:
            if (later := wait_too_long(exc, self.retry)) is not None:
                raise later from None
            if is_retryable(exc):
                raise
            if exc.status_code == 400 and _error_code(exc) in CONTENT_ERROR_CODES:
                return Answer(redact(exc.message, self._secret), "content_filter", True, 0, 0,
                              exc.request_id, self.model)
            # `from None`: the SDK error holds the request, whose headers carry the key.
            raise fatal_error(exc, self._secret) from None
        except (MalformedResponse, AttemptTimeout) as exc:
            raise rules.give_up(exc) from None
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
            # client.post instead of chat.completions.create: same auth, errors and timeout,
            # minus the SDK's per-request TypedDict transform of the messages, which costs
            # ~5 ms of CPU per image message and halved throughput in our measurements.
            # The raw-response header keeps the rate-limit headers (parsed below). wait_for
            # bounds the attempt as a whole: httpx's timeout is per read, and a server that
            # sends a byte a second never trips it.
            try:
                raw = await asyncio.wait_for(self.openai.post(
                    "/chat/completions", cast_to=ChatCompletion,
                    body={"model": self.model, "messages": messages,
                          **completion_params(self.model, max_tokens, temperature, self.reasoning_effort)},
                    options={"headers": {RAW_RESPONSE_HEADER: "true"}},
                ), self.timeout)
            except asyncio.TimeoutError:
                raise AttemptTimeout(f"no complete answer within --timeout {self.timeout:g} s") from None
            except openai.APIConnectionError as exc:
                if "complete message body" in str(exc.__cause__ or ""):  # headers came, the body was cut
                    raise MalformedResponse("the body was cut off before its end", CUT_OFF) from None
                raise
            hold = self.pacer.update(raw.headers, est_tokens)
            if hold > 0:
                self._cooldown_until = max(self._cooldown_until, time.monotonic() + hold)
        body = raw.http_response.content
        try:
            completion = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise MalformedResponse("the body is not JSON (truncated or invalid)", body[:65536]) from None
        if isinstance(completion, dict):
            completion.setdefault("_request_id", raw.headers.get("x-request-id"))
        try:
            return parse_completion(completion)
        except MalformedResponse as exc:
            raise MalformedResponse(str(exc), body[:65536]) from None
