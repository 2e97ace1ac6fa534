"""Where a step runs: the seam between the work and its executors (datatrove's step vs executor).

A step is a picklable callable, ``step(item) -> list[result]``, that never raises on bad input,
with ``step.failed(item, exc) -> list[result]``: what stands for an item whose worker crashed
(`curation.slice_step.SliceStep` is one). An executor runs one step over a list of items and
decides where: `LocalExecutor` here, in this process or a process pool; another executor (Ray
tasks, SLURM array shards) implements `Executor.imap` and runs the same step unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Generic, Iterator, Protocol, Sequence, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class Step(Protocol[ItemT, ResultT]):
    """The work an executor runs on each item."""

    def __call__(self, item: ItemT) -> list[ResultT]: ...

    def failed(self, item: ItemT, exc: BaseException) -> list[ResultT]: ...


class Executor(ABC, Generic[ItemT, ResultT]):
    """Runs a step over work items; subclasses say where (`imap`), the base says what comes back."""

    @abstractmethod
    def imap(self, step: Step[ItemT, ResultT], items: Sequence[ItemT]) -> Iterator[tuple[ItemT, list[ResultT] | BaseException]]:
        """Yield ``(item, results)`` as each item finishes, in any order.

        A worker that crashed yields ``(item, exception)`` instead; an exception raised in
        this process (not a worker's) propagates and ends the run.
        """

    def run(
        self,
        step: Step[ItemT, ResultT],
        items: Sequence[ItemT],
        on_result: Callable[[ItemT, list[ResultT], int, int], None] | None = None,
    ) -> list[ResultT]:
        """Run ``step`` over ``items``; return every result in completion order.

        Args:
            step: the work (picklable where the executor ships it to other processes).
            items: the work items.
            on_result: called after each item as ``on_result(item, results, done, total)``.
                A crashed worker counts as an item whose results are ``step.failed(item, exc)``.
        """
        items = list(items)
        out: list[ResultT] = []
        for done, (item, results) in enumerate(self.imap(step, items), start=1):
            if isinstance(results, BaseException):  # a crashed worker: record it and go on
                results = step.failed(item, results)
            out.extend(results)
            if on_result is not None:
                on_result(item, results, done, len(items))
        return out


def _one_thread() -> None:
    # N workers each with torch's default thread count would oversubscribe the cores.
    import torch

    torch.set_num_threads(1)


class LocalExecutor(Executor[ItemT, ResultT]):
    """This machine: in-process in item order for ``workers <= 1``, else a spawn process pool
    (one torch thread per worker) yielding items as they complete."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def imap(self, step: Step[ItemT, ResultT], items: Sequence[ItemT]) -> Iterator[tuple[ItemT, list[ResultT] | BaseException]]:
        if self.workers <= 1:
            for item in items:
                yield item, step(item)
            return
        import multiprocessing as mp

        # spawn, not fork: a forked copy of torch's thread pools can hang
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"), initializer=_one_thread) as pool:
            futures = {pool.submit(step, item): item for item in items}
            for fut in as_completed(futures):
                try:
                    results: list[ResultT] | BaseException = fut.result()
                except Exception as exc:
                    results = exc
                yield futures[fut], results
