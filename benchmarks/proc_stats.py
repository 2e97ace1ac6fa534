"""Process measurements for the benchmarks: peak RSS of one process or a whole process tree,
CPU seconds, and whole-process runs (interpreter start and imports included) of a command."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from pathlib import Path


def rss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak RSS (ru_maxrss, MB). Linux carries a parent's high-water mark into a forked and
    exec'd child, which is why the parent of this script never loads volumes or heavy modules."""
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: kB


def hwm_mb() -> float | None:
    """VmHWM of this process (MB): the peak RSS of its own address space since exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class TreeRSS:
    """Samples the summed RSS of this process and all its descendants (worker pools); with
    ``include_self=False``, of the descendants only (a benchmark parent timing a command)."""

    def __init__(self, interval: float = 0.05, include_self: bool = True):
        self.include_self = include_self
        self.interval = interval
        self.peak_mb = 0.0
        self.peak_single_mb = 0.0
        self._cpu: dict[int, float] = {}  # pid -> last seen user+sys seconds
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _tree(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        tree, frontier = [os.getpid()], [os.getpid()]
        while frontier:
            frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
            tree.extend(frontier)
        return tree if self.include_self else tree[1:]

    def _sample(self) -> None:
        # the /proc scan for new descendants costs ~4 ms (most of a sample): every 5th sample
        # only, so that the sampler takes under 1% of a core from the command it measures
        self._n = getattr(self, "_n", 0) + 1
        if self._n % 5 == 1 or getattr(self, "_pids", None) is None:
            self._pids = self._tree()
        total = 0.0
        for pid in self._pids:
            try:
                rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page / 2**20
            except (OSError, ValueError, IndexError):
                continue
            total += rss
            self.peak_single_mb = max(self.peak_single_mb, rss)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                self._cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime
            except (OSError, ValueError, IndexError):
                pass
        self.peak_mb = max(self.peak_mb, total)

    @property
    def cpu_s(self) -> float:
        """User+sys seconds of every process seen in the tree (to the last sample of each):
        counts processes nobody waits for, as a fork server and the workers forked from it."""
        return sum(self._cpu.values())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._pids = None
        self._sample()  # nothing left by now; keeps a very short run from reading 0


def cpu_s(children: bool = False) -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    total = ru.ru_utime + ru.ru_stime
    if children:
        rc = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += rc.ru_utime + rc.ru_stime
    return total


def run_process(cmd: list[str], cwd: Path, env: dict[str, str], log_dir: Path, timeout: float = 900) -> dict:
    """Run ``cmd`` as a user would wait for it: wall time from start to exit (interpreter start
    and imports included), its CPU seconds and peak RSS (``wait4``: this child and the workers
    it waited for), and the peak summed RSS of its process tree (sampled every 50 ms). CPU is
    the larger of ``wait4``'s and the tree's sampled sum, which also sees the workers of a fork
    server (no ``wait4`` of ours reaches them).

    stdout/stderr go to files in ``log_dir`` (no pipes to drain while timing); their text comes
    back as ``stdout``/``stderr``.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    load = os.getloadavg()[0]
    with open(out_path, "w") as out, open(err_path, "w") as err, TreeRSS(include_self=False) as tree:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return {
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_s": max(ru.ru_utime + ru.ru_stime, tree.cpu_s),
        "maxrss_mb": ru.ru_maxrss / 1024.0,
        "tree_peak_rss_mb": tree.peak_mb,
        "loadavg_1m": load,
        "stdout": out_path.read_text(),
        "stderr": err_path.read_text(),
    }
