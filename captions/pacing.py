"""Client-side pacing: token buckets for --rpm/--tpm, and pacing from x-ratelimit-* headers.

OpenAI (and servers that copy it) send ``x-ratelimit-limit-requests``/``-tokens`` (per minute),
``x-ratelimit-remaining-*`` and ``x-ratelimit-reset-*`` ("1s", "6m0s", "20ms") on every answer.
When the user gives no ``--rpm``/``--tpm``, ``HeaderPacer`` sets the buckets' rates from the
limits and, when what remains would not cover the requests that may be in flight, holds new
requests until the reset, so the run stays under the limit instead of learning it from 429s.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping

_DURATION = re.compile(
    r"(\d+(?:\.\d+)?)\s*(milliseconds?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|h)(?![a-z])",
    re.I,
)


def parse_duration(text: str) -> float | None:
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
    if not found:
        try:
            return max(0.0, float(text))  # a bare number is seconds
        except ValueError:
            return None
    return total


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

    def set_rate(self, per_minute: float) -> None:
        """Adopt a new limit (from headers); the bucket keeps its level."""
        now = time.monotonic()
        if self.rate is not None:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = min(self.level, self.capacity)
        self.updated = now

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


class HeaderPacer:
    """Reads x-ratelimit-* headers into the buckets the user left unset, and says how long to hold.

    Args:
        rpm, tpm: the request and token buckets.
        paced_requests, paced_tokens: whether headers may set that bucket (no --rpm / --tpm).
        concurrency: requests that may be in flight at once (what "remaining" must cover).
    """

    def __init__(self, rpm: RateLimiter, tpm: RateLimiter, *, paced_requests: bool, paced_tokens: bool,
                 concurrency: int) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.paced = {"requests": paced_requests, "tokens": paced_tokens}
        self.concurrency = concurrency
        self.limits: dict[str, float] = {}  # what the server said, for the summary

    def update(self, headers: Mapping[str, str], est_tokens: int) -> float:
        """Adopt limits from one answer's headers; returns seconds to hold new requests (0: none)."""
        hold = 0.0
        for kind, bucket, need in (("requests", self.rpm, 1), ("tokens", self.tpm, est_tokens)):
            if not self.paced[kind]:
                continue
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            if limit is not None and limit > 0:
                if self.limits.get(kind) != limit:
                    bucket.set_rate(limit)
                    self.limits[kind] = limit
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}") or "")
            if remaining is not None and reset and remaining < need * self.concurrency:
                hold = max(hold, reset)
        return hold


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
