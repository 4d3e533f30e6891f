"""Under torchrun: train several runs in turn in one process group.

    torchrun --nproc-per-node N tests/trainer/train_driver.py OUT_DIR '{"name": ["CONFIG", "K=V", ...]}'

Each run names its config and overrides (one config under several parallel layouts, or several
stages) and writes OUT_DIR/<name>/metrics.jsonl. One launch amortises process start-up (~5 s of
importing megatron per process) over all runs of a world size.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kiln.log import setup_logging  # noqa: E402
from tensor_parallel import runtime  # noqa: E402
from trainer.config import load_run_config  # noqa: E402
from trainer.loop import train  # noqa: E402


def main() -> None:
    setup_logging("WARNING")
    out, runs = sys.argv[1], json.loads(sys.argv[2])
    for name, (config, *overrides) in runs.items():
        cfg = load_run_config(config, [*overrides, f"run_dir={os.path.join(out, name)}"])
        p = cfg.parallel
        runtime.init(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed)
        train(cfg)
        runtime.shutdown(keep_process_group=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
