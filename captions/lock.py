"""One paying caption run per workdir: an OS file lock beside the caption cache.

``fcntl.flock`` on ``cache/captions.lock`` (exclusive, per open file): the kernel drops it when
the holder exits for any reason, ``kill -9`` included, so a stale lock never blocks a rerun. The
file holds who has it (pid, host, start time; never a key or a command line), written after the
lock is taken, so a second run can name the holder in one line or wait for it (``--wait``).
A lock on a network filesystem is only as good as that filesystem's flock support.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from captions.errors import RunLocked


class RunLock:
    """Exclusive lock for one run; use as a context manager.

    Args:
        path: the lock file (created when missing).
        wait: block until the holder is done instead of raising ``RunLocked``.
        on_wait: called once with the holder line before waiting.
    """

    def __init__(self, path: str | Path, *, wait: bool = False,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.wait = wait
        self.on_wait = on_wait
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                line = f"another caption run holds {self.path} ({holder(self.path)})"
                if not self.wait:
                    raise RunLocked(f"{line}; wait for it to finish or pass --wait") from None
                if self.on_wait is not None:
                    self.on_wait(f"{line}; waiting for it to finish")
                fcntl.flock(fd, fcntl.LOCK_EX)
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)  # closing drops the lock if we had it
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # nobody holds it now
        finally:
            os.close(self._fd)  # drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: str | Path, attempts: int = 5) -> str:
    """"pid 123 on host, started 2026-01-01T00:00:00+00:00" from the lock file, best effort."""
    for _ in range(attempts):
        try:
            info = json.loads(Path(path).read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
        time.sleep(0.05)  # the holder writes its line right after taking the lock
    return "holder unknown"
