"""Where a step runs: the seam between the work and its executors (datatrove's step vs executor).

A step is a picklable callable, ``step(item) -> list[result]``, that never raises on bad input,
with ``step.failed(item, exc) -> list[result]``: what stands for an item whose worker crashed
(`curation.slicing.step.SliceStep` is one). An executor runs one step over a list of items and
decides where: `LocalExecutor` here, in this process or a process pool; `RayExecutor`
(``curation.executors.ray_executor``, Ray tasks on a cluster) implements `Executor.imap` and runs the same
step unchanged; SLURM array jobs run a shard of the items each (``--shard auto``), locally.
`curation.slicing.stage.make_executor` picks one by name (``--executor local|ray``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing.context import BaseContext
from typing import Any, Callable, Generator, Generic, Iterator, Protocol, Sequence, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class Step(Protocol[ItemT, ResultT]):
    """The work an executor runs on each item."""

    def __call__(self, item: ItemT) -> list[ResultT]: ...

    def failed(self, item: ItemT, exc: BaseException) -> list[ResultT]: ...


class Executor(ABC, Generic[ItemT, ResultT]):
    """Runs a step over work items; subclasses say where (`imap`), the base says what comes back."""

    @property
    def parallel(self) -> bool:
        """Whether items run side by side (then the order they are handed out in matters:
        `curation.slicing.schedule` puts the largest first)."""
        return True

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


# N workers each with a BLAS/OpenMP pool per core would oversubscribe the cores.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _one_thread() -> None:
    # Runs first in each worker. The variables reach libraries the worker loads later; torch,
    # if already loaded (preloaded by the fork server), is told directly (importing it here
    # would cost a worker seconds and hundreds of MB on a path that may not need it).
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@contextmanager
def _one_thread_env() -> Iterator[None]:
    """THREAD_VARS = 1 (where unset) while a fork server starts, so its preloaded BLAS/OpenMP
    libraries, and every worker forked from it, start with one thread."""
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    for var in THREAD_VARS:
        os.environ.setdefault(var, "1")
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)


def start_fork_server(module: str) -> BaseContext:
    """Start this process's fork server, importing ``module`` (no-op when it runs already).

    It returns at once: the server imports in its own process, so a caller that starts it
    before its own heavy imports pays for them once, on two cores side by side. Where there is
    no fork server: the spawn context.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([module])  # effective when the server starts
    with _one_thread_env():
        forkserver.ensure_running()
    return ctx


def pool_context(step: object) -> BaseContext:
    """A fork server that has imported the step's ``worker_module`` (default: its own module)
    once: each worker is a fork of it and skips the seconds of imports a spawned interpreter
    pays (and shares those pages). Forked
    from a process that ran no work, not from the caller (a fork of live torch thread pools can
    hang). Where there is no fork server: spawn."""
    return start_fork_server(getattr(step, "worker_module", type(step).__module__))


class LocalExecutor(Executor[ItemT, ResultT]):
    """This machine: in-process in item order for ``workers <= 1``, else a pool of worker
    processes (one thread each, forked from a fork server) yielding items as they complete.

    Items are handed out in the order given, ``2 * workers`` submitted at a time: a worker that
    finishes takes the next queued item at once, without waiting for this process to handle the
    result it sent (the caller's ``on_result`` may take a while: `curate slice` imports pandas
    after the first volume).

    A worker that dies (killed for memory, a segfault in a reader) breaks the whole pool; the
    items submitted to it and not finished are then rerun one at a time, each alone in a fresh
    pool, so that only the one that dies again comes back as ``(item, exception)``, and the rest
    goes on.
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    @property
    def parallel(self) -> bool:
        return self.workers > 1

    def imap(self, step: Step[ItemT, ResultT], items: Sequence[ItemT]) -> Iterator[tuple[ItemT, list[ResultT] | BaseException]]:
        workers = min(self.workers, len(items))  # a shard of one volume starts no pool
        if workers <= 1:
            for item in items:
                yield item, step(item)
            return
        ctx = pool_context(step)
        todo = deque(items)
        while todo:
            suspects = yield from _pool_run(step, todo, workers, ctx)
            for item, _ in suspects:
                again = yield from _pool_run(step, deque([item]), 1, ctx)
                if again:
                    yield item, again[0][1]


# Items submitted per worker: the one it runs and the next, so that it never waits for this process.
QUEUED_PER_WORKER = 2


def _pool_run(step: Step, todo: deque, workers: int, ctx: BaseContext) -> Generator[tuple[Any, Any], None, list[tuple[Any, BaseException]]]:
    """Run ``todo`` on one pool, ``QUEUED_PER_WORKER * workers`` items submitted at a time (one
    running and one queued per worker); yield ``(item, results)``.

    Returns the items in flight when a worker died and broke the pool, with the error (the
    rest of ``todo`` stays for the next pool), or ``[]`` once ``todo`` is done.
    """
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_one_thread) as pool:
        running: dict[Future, Any] = {}

        def fill() -> None:
            while todo and len(running) < QUEUED_PER_WORKER * workers:
                item = todo.popleft()
                running[pool.submit(step, item)] = item

        fill()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken: list[tuple[Any, BaseException]] = []
            for fut in done:
                item = running.pop(fut)
                exc = fut.exception()
                if isinstance(exc, BrokenProcessPool):
                    broken.append((item, exc))
                else:
                    yield item, (exc if exc is not None else fut.result())
            if broken:
                for fut in list(running):  # finished before the break: keep; else a suspect
                    item = running.pop(fut)
                    exc = fut.exception() if fut.done() else None
                    if fut.done() and not isinstance(exc, BrokenProcessPool):
                        yield item, (exc if exc is not None else fut.result())
                    else:
                        broken.append((item, exc or BrokenProcessPool("worker pool broke")))
                return broken
            fill()
    return []
