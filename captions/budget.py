"""--budget and --max-usd: the one place that says what a run may spend and what counts.

``--budget N`` means "the first N slices of the selection order": every slice counts, whether
its answer is free (cached, a duplicate of an earlier slice's image, or inside a pending batch)
or needs a new request; free ones cost nothing. So the same command rerun (after ``kill -9`` or
after success) asks for the same N slices and, once they are answered, sends nothing. A fallback
re-ask of a refused slice belongs to that slice and is not counted again (``--max-usd`` still
caps it). The release's selection (slices, in selection order) and the engine's plan (requests,
in the same order) both ask a ``Budget`` and count nothing themselves.

``--max-usd X`` is checked twice against the same object: the plan admits new requests while
the sum of their estimates stays within X, and the sync run sends a request only while reported
spend plus the estimates of requests in flight plus its own estimate stays within X.
"""

from __future__ import annotations

from dataclasses import dataclass

from captions.options import CaptionOptions


@dataclass
class Budget:
    """What one stage of a run may still take; requests are bought in order, never skipped ahead."""

    limit: int | None = None  # --budget
    max_usd: float | None = None  # --max-usd
    used: int = 0  # slices taken so far (free or not)
    planned_usd: float = 0.0  # estimates of the requests admitted by ``take``
    spent_usd: float = 0.0  # reported usage of the answers so far (sync run)
    in_flight_usd: float = 0.0  # estimates of the requests on the wire (sync run)
    stopped: str | None = None  # why ``take`` refused by --max-usd, once it has

    @classmethod
    def of(cls, options: CaptionOptions) -> Budget:
        return cls(limit=options.budget, max_usd=options.max_usd)

    # --budget --------------------------------------------------------------------------
    def room(self, free: bool = False) -> bool:
        """Whether ``take(free)`` can still succeed on the count (check before estimating)."""
        return (self.limit is None or self.used < self.limit) and (free or self.stopped is None)

    def take(self, free: bool = False, usd: float | None = None) -> bool:
        """Hold the next slice in order, if --budget and --max-usd allow it.

        Args:
            free: it needs no new request (cached, duplicate or pending): it still counts
                toward --budget, but never toward --max-usd.
            usd: its estimated cost, for --max-usd (None: unpriced or not estimated).

        Returns:
            False once either limit is reached; after a --max-usd refusal every later new
            request is refused too, so a cheaper one never jumps the queue.
        """
        if not self.room(free):
            return False
        if not free and self.max_usd is not None and usd is not None and self.planned_usd + usd > self.max_usd:
            self.stopped = f"--max-usd {self.max_usd:g} reached by estimate"
            return False
        self.used += 1
        self.planned_usd += 0.0 if free else usd or 0.0
        return True

    @property
    def left(self) -> int | None:
        """How many more counted slices fit (None: no --budget)."""
        return None if self.limit is None else max(0, self.limit - self.used)

    @property
    def full(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    # --max-usd while sending -----------------------------------------------------------
    def may_send(self, usd: float | None) -> bool:
        """Run-time guard: reported spend plus requests in flight plus this one within --max-usd."""
        return self.max_usd is None or usd is None or self.spent_usd + self.in_flight_usd + usd <= self.max_usd

    @property
    def send_stop(self) -> str:
        return f"--max-usd {self.max_usd:g} reached"

    def reserve(self, usd: float | None) -> None:
        """A request goes on the wire with this estimate."""
        self.in_flight_usd += usd or 0.0

    def release(self, usd: float | None) -> None:
        """A request came back (answered or not): its estimate is no longer in flight."""
        self.in_flight_usd -= usd or 0.0

    def spend(self, usd: float | None) -> None:
        """An answer's reported cost, once it is committed."""
        self.spent_usd += usd or 0.0
