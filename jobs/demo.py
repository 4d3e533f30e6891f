"""`kiln demo`: the whole lifecycle on the embedded sample data, on CPU, ending with a per-stage
report of ledger counts and training metrics.

Stages: serve the Node.js API docs on loopback -> crawl them to WARC -> clean the crawl plus the
real (partly broken) sample WARC files -> dedup -> train a tokenizer -> token shards -> SFT and
preference shards from HH-RLHF -> validate everything -> pretrain -> SFT -> reward model -> DPO ->
GRPO. Each stage runs the same command a user would (`kiln <job>`, `torchrun trainer/main.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.cli import resolve
from kiln.errors import KilnError
from kiln.log import get_logger

log = get_logger(__name__)
SAMPLE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DemoError(KilnError):
    exit_code = 1


@dataclass
class StageResult:
    name: str
    seconds: float
    ledger: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)


@dataclass
class Demo:
    out: str
    max_pages: int
    vocab_size: int
    workers: int
    results: list[StageResult] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return self.paths.setdefault(name, os.path.join(self.out, name))

    def kiln(self, command: str, argv: Sequence[str]) -> None:
        """Run `kiln <command> argv` in this process; a non-zero exit stops the demo."""
        log.info("$ kiln %s %s", command, " ".join(argv))
        code = resolve(command)(list(argv))
        if code:
            raise DemoError(f"stage failed: kiln {command} exited {code}")

    def beam_args(self) -> list[str]:
        if self.workers > 1:
            return ["--direct_running_mode=multi_processing",
                    f"--direct_num_workers={self.workers}"]
        return []


def ledger_of(directory: str) -> list[dict[str, Any]]:
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)["ledger"]["stages"]


def run_stages(demo: Demo, stages: Sequence[tuple[str, Callable[[Demo], StageResult]]]) -> None:
    for name, fn in stages:
        log.info("=== demo stage: %s", name)
        start = time.monotonic()
        result = fn(demo)
        result.seconds = time.monotonic() - start
        demo.results.append(result)
        log.info("=== %s done in %.1f s", name, result.seconds)


def report(demo: Demo) -> str:
    """The closing per-stage table: ledger counts of data stages, metrics of training stages."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="llmkiln demo", show_lines=False)
    for col in ("stage", "step", "input", "kept", "filtered", "dup", "error", "metrics", "s"):
        table.add_column(col, justify="right" if col not in ("stage", "step", "metrics") else "left")
    for r in demo.results:
        first = True
        for s in r.ledger or [{}]:
            filtered = s.get("filtered", {})
            table.add_row(r.name if first else "", s.get("name", ""), _n(s.get("input")),
                          _n(s.get("kept")), _n(sum(filtered.values())) if s else "",
                          _n(s.get("duplicate")), _n(s.get("error")),
                          _fmt_metrics(r.metrics) if first else "",
                          f"{r.seconds:.0f}" if first else "")
            first = False
    console = Console(record=True, width=160)
    console.print(table)
    return console.export_text()


def _n(v: Any) -> str:
    return "" if v is None else f"{v:,}"


def _fmt_metrics(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def main(argv: Sequence[str] | None = None) -> int:
    from jobs.demo_stages import STAGES

    parser = argparse.ArgumentParser(prog="kiln demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    parser.add_argument("--max-pages", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=1, help="Beam local workers")
    parser.add_argument("--only", nargs="*", help="run only these stages (need earlier outputs)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    demo = Demo(out=os.path.abspath(args.out), max_pages=args.max_pages,
                vocab_size=args.vocab_size, workers=args.workers)
    os.makedirs(demo.out, exist_ok=True)
    stages = [(n, f) for n, f in STAGES if not args.only or n in args.only]
    start = time.monotonic()
    run_stages(demo, stages)
    text = report(demo)
    with open(os.path.join(demo.out, "demo-report.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(demo.out, "demo-report.json"), "w", encoding="utf-8") as f:
        json.dump([r.__dict__ for r in demo.results], f, indent=2)
    log.info("demo finished in %.0f s; report in %s", time.monotonic() - start,
             os.path.join(demo.out, "demo-report.txt"))
    return 0


if __name__ == "__main__":
    import sys

    from kiln.cli import entry

    sys.exit(entry(main))
