"""The demo's stages, in order: each runs the command a user would and returns what it produced."""

from __future__ import annotations

import json
import os

from jobs.demo import Demo, StageResult


def crawl(demo: Demo) -> StageResult:
    """Serve the Node.js API docs on loopback and crawl them politely into WARC."""
    from jobs.serve_site import serve_sample_site

    base_url, stop = serve_sample_site()
    try:
        seeds = os.path.join(demo.out, "seeds.txt")
        with open(seeds, "w", encoding="utf-8") as f:
            f.write(f"{base_url}/index.html\n")
        demo.kiln("crawl", ["--seeds", seeds, "--out", demo.path("crawl"), "--allow-private",
                            "--max-pages", str(demo.max_pages), "--max-depth", "3",
                            "--delay", "0", "--no-progress"])
    finally:
        stop()
    with open(os.path.join(demo.path("crawl"), "crawl-report.json"), encoding="utf-8") as f:
        crawl_report = json.load(f)
    fetched = crawl_report.get("fetched", 0)
    return StageResult("crawl", 0.0, metrics={"pages": fetched,
                                             "errors": sum(crawl_report.get("errors", {}).values())},
                       outputs=[demo.path("crawl")])


STAGES = [
    ("crawl", crawl),
]
