"""The torchrun entry: `torchrun trainer/main.py --config FILE.yaml [--set key=value ...]`.

Also runs as `python trainer/main.py ...` (a group of one). Configuration errors exit with 2 and
one line naming the key, no traceback. A run stopped early by a signal saves a checkpoint and
exits with 128 + the signal's number; one stopped by `train.time_limit_minutes` saves and exits
with 0 (trainer/preemption.py).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # `python trainer/main.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kiln.config import dump_yaml  # noqa: E402
from kiln.log import get_logger  # noqa: E402

log = get_logger("trainer.main")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer/main.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys (repeatable), e.g. --set parallel.tp=2 train.steps=5")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    started = time.monotonic()  # train.time_limit_minutes counts from here
    faulthandler.enable()  # a crash in native code leaves its Python stack
    args = parse_args(argv)
    from trainer.config import load_run_config

    cfg = load_run_config(args.config, args.set)
    from tensor_parallel import runtime
    from trainer.loop import train
    from trainer.preemption import StopRequested

    p = cfg.parallel
    runtime.init(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed,
                 timeout_minutes=p.timeout_minutes)
    try:
        if runtime.rank() == 0:
            os.makedirs(cfg.run_dir, exist_ok=True)
            with open(os.path.join(cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(dump_yaml(cfg))
        state = train(cfg, started)
    except StopRequested as stop:
        runtime.shutdown()
        log.warning("%s", stop)
        return stop.exit_code
    except BaseException:
        runtime.abort()
        raise
    runtime.shutdown()
    log.info("done: %d steps (%d skipped); run directory %s", state.step, state.skipped_steps,
             cfg.run_dir)
    return 0


if __name__ == "__main__":
    from kiln.cli import entry

    sys.exit(entry(main))
