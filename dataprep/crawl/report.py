"""`crawl-report.json`: counts over the whole crawl (every run), derived from the journal alone."""

from __future__ import annotations

from collections import Counter
from typing import Any

from dataprep.crawl.state import CrawlState


def crawl_report(state: CrawlState, warc_files: list[str], frontier_left: int,
                 this_run: dict[str, Any]) -> dict[str, Any]:
    status: Counter[str] = Counter()
    depth: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    pages = size = truncated = 0
    for event in state.done.values():
        outcome = event["outcome"]
        if outcome == "fetched":
            pages += 1
            size += event["bytes"]
            truncated += bool(event.get("truncated"))
            status[str(event["status"])] += 1
            depth[str(event["depth"])] += 1
            if event["status"] >= 500:
                errors[f"http-{event['status']}"] += 1
        elif outcome == "skipped":
            skipped[event["reason"]] += 1
        else:
            errors[event["reason"]] += 1
        dropped.update(event.get("dropped", {}))
    return {
        "fetched": pages,
        "bytes": size,
        "truncated": truncated,
        "status": dict(sorted(status.items())),
        "depth": dict(sorted(depth.items(), key=lambda kv: int(kv[0]))),
        "skipped": dict(sorted(skipped.items())),
        "errors": dict(sorted(errors.items())),
        "links_dropped": dict(sorted(dropped.items())),
        "queued": len(state.queued),
        "frontier_left": frontier_left,
        "warc_files": warc_files,
        "this_run": this_run,
    }


def summary_line(report: dict[str, Any]) -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in report["skipped"].items()) or "none"
    errors = ", ".join(f"{k}={v}" for k, v in report["errors"].items()) or "none"
    return (f"crawl: {report['fetched']} pages, {report['bytes'] / 1e6:.2f} MB in "
            f"{len(report['warc_files'])} WARC file(s); skipped: {skipped}; errors: {errors}; "
            f"frontier left: {report['frontier_left']}")
