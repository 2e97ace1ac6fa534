"""The console scripts' entry module, kept light on purpose.

`curate slice --workers N` starts its workers' fork server here, before the command-line
machinery and the slicing modules load, so that the server's imports and this process's run
side by side on two cores. And every worker re-imports the script's module when it starts:
this one costs it nothing.
"""

from __future__ import annotations

import sys


def _option(argv: list[str], name: str, default: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def prestart_slice_workers(argv: list[str]) -> bool:
    """Start the fork server `curate slice` will fork its workers from, when ``argv`` asks for
    local workers; True when it did. Anything unusual is left to the command's own parsing."""
    if not argv or argv[0] != "slice" or "--help" in argv:
        return False
    try:
        workers = int(_option(argv, "--workers", "1"))
    except ValueError:
        return False
    from curation.slicing.prestart import start_slice_workers

    return start_slice_workers(workers, _option(argv, "--executor", "local"))


def curate() -> None:
    """Console script `curate`."""
    prestart_slice_workers(sys.argv[1:])
    from med3dinsight.curate import run

    run()


def train() -> None:
    """Console script `train`."""
    from med3dinsight.train import run

    run()
