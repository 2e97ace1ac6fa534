"""Run `pretrain` from a JSON file of PretrainConfig fields; the kill and torchrun tests start
this as a subprocess (directly, or under ``torchrun --nproc-per-node N``).

    python tests/pretrain_driver.py --config cfg.json [--out result.json] [--step-sleep S]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from training.pretrain.train import PretrainConfig, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="rank 0 writes the result here")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after every step")
    args = parser.parse_args()
    fields = json.loads(args.config.read_text())
    fields["workdir"] = Path(fields["workdir"])
    on_step = (lambda step, row: time.sleep(args.step_sleep)) if args.step_sleep else None
    result = pretrain(PretrainConfig(**fields), on_step=on_step)
    if args.out is not None and int(os.environ.get("RANK", "0")) == 0:
        args.out.write_text(json.dumps({
            "start_step": result.start_step, "step": result.step, "losses": result.losses,
            "world_size": result.world_size, "retrieval": result.retrieval,
        }))


if __name__ == "__main__":
    main()
