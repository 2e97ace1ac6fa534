"""`RayExecutor`: the same step on a Ray cluster (``curate slice --executor ray``), one Ray task per item.

Ray is an optional extra (``pip install 'med3dinsight[ray]'``) and is imported only when a
`RayExecutor` runs, so `curation` imports without it. The executor ships the step once
(``ray.put``) and each item in its own task (``num_cpus=1``, no retries: a task that fails comes
back as ``(item, exception)`` and the run records it through ``step.failed``). What comes back
is the step's small records; volumes are written by the task straight into the workdir, which
must therefore be on a file system every node sees (as on a SLURM cluster).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

from curation.executors.local import Executor, ItemT, ResultT, Step

INSTALL_HINT = "--executor ray needs Ray: pip install 'med3dinsight[ray]' (or ray>=2.58)"


class TaskLost(RuntimeError):
    """A Ray task that ended without the step's answer (its worker or node died), in one line."""


def import_ray() -> Any:
    """``import ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return ray


def _run_in(cwd: str, step: Step, item: Any) -> Any:
    # Relative paths (--workdir ., --root data) mean the driver's folder: on a shared file system
    # a worker started elsewhere (`ray start` in $HOME) finds it; elsewhere it keeps its own.
    here = os.getcwd()
    moved = cwd != here and os.path.isdir(cwd)
    if moved:
        os.chdir(cwd)
    try:
        return step(item)
    finally:
        if moved:
            os.chdir(here)


def _unwrap(ray: Any, exc: BaseException) -> BaseException:
    """The step's own exception where Ray carried it; else a one-line `TaskLost`."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayError):
            return cause
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return TaskLost(f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"[:300])


class RayExecutor(Executor[ItemT, ResultT]):
    """Runs each item as a Ray task, yielding items as they complete.

    Args:
        address: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None
            connects to the Ray this process already joined, else starts a local one.
        num_cpus: CPUs of a local Ray started here (None: all of this machine's).
        max_in_flight: tasks submitted ahead of the results (default: twice the cluster's CPUs),
            so a 10,000-volume run keeps a bounded queue.
    """

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_in_flight: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.max_in_flight = max_in_flight

    def _connect(self, ray: Any) -> bool:
        """Join or start Ray; True when this call started it (and so shuts it down)."""
        if ray.is_initialized():
            return False
        import logging

        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if self.address:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except ConnectionError as exc:  # name our flag, not Ray's `--address`
                first = (str(exc).strip().splitlines() or ["cannot connect"])[0]
                raise ConnectionError(f"--ray-address {self.address}: {first}") from None
        else:
            ray.init(num_cpus=self.num_cpus, **quiet)
        return True

    def imap(self, step: Step[ItemT, ResultT], items: Sequence[ItemT]) -> Iterator[tuple[ItemT, list[ResultT] | BaseException]]:
        items = list(items)
        if not items:
            return
        ray = import_ray()
        started = self._connect(ray)
        try:
            run = ray.remote(num_cpus=1, max_retries=0, retry_exceptions=False)(_run_in)
            step_ref = ray.put(step)
            cwd = os.getcwd()
            window = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
            queue = iter(items)
            pending: dict[Any, ItemT] = {}

            def submit() -> None:
                for item in queue:
                    pending[run.remote(cwd, step_ref, item)] = item
                    if len(pending) >= window:
                        return

            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    item = pending.pop(ref)
                    try:
                        results: list[ResultT] | BaseException = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        results = _unwrap(ray, exc)
                    yield item, results
                submit()
        finally:
            if started:
                ray.shutdown()
