"""Starting `curate slice`'s local workers early: the one place that knows which module they
preload and when a fork server is worth starting.

Kept free of heavy imports on purpose: the console script calls `start_slice_workers` before the
command-line machinery and the slicing modules load, so that the fork server's imports (SciPy,
the slicing step) and the main process's run side by side on two cores.
"""

from __future__ import annotations

# What a `curate slice` worker preloads (the fork server imports it once; each worker is a fork).
WORKER_MODULE = "curation.slicing.worker"


def start_slice_workers(workers: int, executor: str = "local") -> bool:
    """Start the fork server local workers are forked from, when ``workers`` > 1 on the local
    executor (a no-op when it runs already); True when it did."""
    if workers < 2 or executor != "local":
        return False
    from curation.executors.local import start_fork_server

    start_fork_server(WORKER_MODULE)
    return True
