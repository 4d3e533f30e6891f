"""The fetch loop: one coordinating thread owns the frontier, WARC writer and journal; worker
threads only do network I/O. Per-URL decisions are the plain functions of the sibling modules."""

from __future__ import annotations

import fcntl
import json
import os
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from dataprep.crawl.config import CrawlConfig
from dataprep.crawl.fetch import (
    Exchange,
    FetchLimits,
    FetchResult,
    fetch_robots,
    fetch_with_retries,
)
from dataprep.crawl.frontier import Frontier, HostSlot
from dataprep.crawl.links import extract_links, media_type
from dataprep.crawl.policy import RetryPolicy
from dataprep.crawl.report import crawl_report, summary_line
from dataprep.crawl.robots import RobotsRules, robots_token
from dataprep.crawl.state import (
    JOURNAL_NAME,
    CrawlState,
    FrontierEntry,
    Journal,
    load_journal,
    recover_warc_tails,
)
from dataprep.crawl.urls import host_of, in_scope, normalize_url, origin, path_and_query
from dataprep.crawl.warc import PageRecord, WarcFileWriter, WarcLocation, list_warc_files
from kiln.errors import UsageError
from kiln.log import get_logger
from kiln.paths import write_text
from kiln.progress import Counter as ProgressCounter
from kiln.progress import counter

log = get_logger(__name__)

REPORT_NAME = "crawl-report.json"
HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class _Task:
    slot: HostSlot
    entry: FrontierEntry | None  # None: the origin's robots.txt
    origin: str
    started: float


class Crawler:
    """A resumable crawl into `out_dir`: call `run()`; running it again continues where it stopped."""

    def __init__(self, config: CrawlConfig, seeds: list[str], out_dir: str,
                 progress: bool = True) -> None:
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        os.makedirs(out_dir, exist_ok=True)
        self._lock_fd = _lock_directory(out_dir)
        self.allowed_hosts = {host_of(s) for s in seeds} | {
            h.lower().rstrip(".") for h in config.scope.allow_hosts}
        self.token = robots_token(config.fetch.user_agent)
        self.limits = FetchLimits(config.fetch.user_agent, config.fetch.timeout_s,
                                  config.fetch.deadline_s, config.fetch.max_bytes,
                                  tuple(config.fetch.content_types), config.scope.allow_private)
        self.policy = RetryPolicy(config.fetch.max_retries, config.fetch.backoff_s,
                                  config.fetch.max_backoff_s)
        self.frontier = Frontier(config.politeness.delay_s, config.politeness.per_host_concurrency)
        self.robots_notes: dict[str, str] = {}
        self.run_counts: Counter[str] = Counter()

        journal_path = os.path.join(out_dir, JOURNAL_NAME)
        self.state = CrawlState()
        for event in load_journal(journal_path):
            self.state.apply(event)
        resumed = bool(self.state.queued)
        self.journal = Journal(journal_path)
        for page, location in recover_warc_tails(out_dir, config.output.prefix,
                                                 self.state.warc_ends):
            self._record_page(page, location)  # its outlinks join the frontier with the pending
            self.run_counts["recovered"] += 1
        new_seeds = [FrontierEntry(s, 0) for s in dict.fromkeys(seeds)
                     if s not in self.state.queued]
        if new_seeds:
            self._journal({"e": "queue", "queued": [e.to_json() for e in new_seeds]})
        for entry in self.state.pending():
            self.frontier.push(entry)
        if resumed:
            log.info("resuming crawl in %s: %d done, %d pages, %d queued", out_dir,
                     len(self.state.done), self.state.pages(), len(self.frontier))
        self.writer = WarcFileWriter(out_dir, config.output.prefix, config.output.max_file_bytes,
                                     config.fetch.user_agent, config.output.warc_version)

    def run(self) -> dict[str, Any]:
        """Crawl until the frontier is empty or the page budget is spent; return the report."""
        workers = ThreadPoolExecutor(self.config.politeness.concurrency, "crawl")
        in_flight: dict[Future, _Task] = {}
        try:
            with counter("crawl", total=self.config.scope.max_pages,
                         enabled=self.progress) as display:
                display.advance(self.state.pages())
                while True:
                    self._dispatch(workers, in_flight)
                    budget_open = self._budget_left(_pages(in_flight)) > 0
                    wake = self.frontier.next_wake() if budget_open else None
                    timeout = None if wake is None else max(0.0, wake - time.monotonic())
                    if not in_flight:
                        if wake is None:  # nothing running and nothing that could start
                            break
                        time.sleep(timeout or 0.0)
                        continue
                    finished, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
                    for future in finished:
                        self._complete(in_flight.pop(future), future.result(), display)
        finally:
            workers.shutdown(wait=False, cancel_futures=True)
            self.writer.close()
            self.journal.close()
            report = self._write_report()
            os.close(self._lock_fd)
        print(summary_line(report), flush=True)
        return report

    def _dispatch(self, workers: ThreadPoolExecutor, in_flight: dict[Future, _Task]) -> None:
        now = time.monotonic()
        for slot in self.frontier.ready(now):
            if len(in_flight) >= self.config.politeness.concurrency:
                return
            while slot.queue and self._budget_left(_pages(in_flight)) > 0:
                site = origin(slot.head().url)
                rules = slot.robots.get(site)
                if rules is None:  # the origin's robots.txt comes first, on the host's slot
                    if site not in slot.robots_pending:
                        slot.robots_pending.add(site)
                        self._submit(workers, in_flight, _Task(slot, None, site, now))
                    break
                entry = self.frontier.pop(slot)
                skip = self._skip_reason(entry, rules)
                if skip is None:
                    self._submit(workers, in_flight, _Task(slot, entry, site, now))
                    break
                self._journal_outcome(entry, *skip)
                self.run_counts[skip[0]] += 1

    def _submit(self, workers: ThreadPoolExecutor, in_flight: dict[Future, _Task],
                task: _Task) -> None:
        self.frontier.start(task.slot, task.started)
        if task.entry is None:
            future = workers.submit(fetch_robots, task.origin, self.limits, self.policy,
                                    min_wait=task.slot.delay_s)
        else:
            future = workers.submit(fetch_with_retries, task.entry.url, self.limits, self.policy,
                                    min_wait=task.slot.delay_s)
        in_flight[future] = task

    def _skip_reason(self, entry: FrontierEntry,
                     robots: RobotsRules) -> tuple[str, str, str] | None:
        """(outcome, reason, detail) for a URL that must not be fetched, else None."""
        if not in_scope(entry.url, self.allowed_hosts) or entry.depth > self.config.scope.max_depth:
            return "skipped", "scope", "outside the current scope or depth limit"
        if robots.source == "unreachable":
            return "error", "robots-unavailable", self.robots_notes.get(origin(entry.url), "")
        if not robots.allows(self.token, path_and_query(entry.url)):
            return "skipped", "robots", "disallowed by robots.txt"
        return None

    def _complete(self, task: _Task, result: Any, display: ProgressCounter) -> None:
        now = time.monotonic()
        if task.entry is None:
            rules, note = result
            task.slot.robots[task.origin] = rules
            task.slot.robots_pending.discard(task.origin)
            self.robots_notes[task.origin] = note
            self.frontier.apply_crawl_delay(task.slot, rules.crawl_delay(self.token),
                                            self.config.politeness.max_crawl_delay_s)
            self.frontier.finish(task.slot, now)
            log.info("robots.txt for %s: %s (%s)", task.origin, note, rules.source)
            return
        self.frontier.finish(task.slot, now)
        fetched: FetchResult = result
        self.run_counts[fetched.outcome] += 1
        if fetched.exchange is None:
            log.debug("%s: %s %s %s", task.entry.url, fetched.outcome, fetched.reason,
                      fetched.detail)
            self._journal_outcome(task.entry, fetched.outcome, fetched.reason, fetched.detail)
            display.advance(0, **({"errors": 1} if fetched.outcome == "error" else {"skipped": 1}))
            return
        page = self._page_record(task.entry, fetched.exchange)
        location = self.writer.write_page(page, fetched.exchange, int((now - task.started) * 1000))
        for entry in self._record_page(page, location):
            self.frontier.push(entry)
        display.advance(1, bytes=page.size, errors=int(page.status >= 500))

    def _page_record(self, entry: FrontierEntry, exchange: Exchange) -> PageRecord:
        page = PageRecord(entry.url, entry.depth, entry.redirects, entry.via, exchange.status,
                          len(exchange.body), exchange.truncated)
        location = exchange.header("Location")
        content_type = exchange.header("Content-Type") or ""
        if 300 <= exchange.status < 400 and location:
            page.redirect = normalize_url(location, entry.url)
        elif 200 <= exchange.status < 300 and media_type(content_type) in HTML_TYPES:
            body = _decoded(exchange.body, exchange.header("Content-Encoding"),
                            self.config.fetch.max_bytes)
            page.outlinks = extract_links(body, entry.url, content_type).links
        return page

    def _record_page(self, page: PageRecord, location: WarcLocation) -> list[FrontierEntry]:
        """Journal an archived page as done, queueing its admissible outlinks in the same line;
        returns the newly queued entries."""
        queued, dropped = self._admit(page)
        self._journal({"e": "done", "url": page.url, "outcome": "fetched", "status": page.status,
                       "depth": page.depth, "bytes": page.size, "truncated": page.truncated,
                       "warc": location.file, "offset": location.offset, "end": location.end,
                       "queued": [e.to_json() for e in queued], "dropped": dropped})
        return queued

    def _admit(self, page: PageRecord) -> tuple[list[FrontierEntry], dict[str, int]]:
        dropped: Counter[str] = Counter()
        candidates = []
        if page.redirect:
            if page.redirects >= self.config.fetch.max_redirects:
                dropped["too-many-redirects"] += 1
            else:
                candidates.append(FrontierEntry(page.redirect, page.depth, page.redirects + 1,
                                                page.url))
        for link in page.outlinks:
            if page.depth + 1 > self.config.scope.max_depth:
                dropped["too-deep"] += 1
            else:
                candidates.append(FrontierEntry(link, page.depth + 1, 0, page.url))
        queued: dict[str, FrontierEntry] = {}
        for entry in candidates:
            if not in_scope(entry.url, self.allowed_hosts):
                dropped["out-of-scope"] += 1
            elif entry.url not in self.state.queued:
                queued.setdefault(entry.url, entry)
        return list(queued.values()), dict(dropped)

    def _journal_outcome(self, entry: FrontierEntry, outcome: str, reason: str,
                         detail: str) -> None:
        self._journal({"e": "done", "url": entry.url, "outcome": outcome, "reason": reason,
                       "depth": entry.depth, "detail": detail})

    def _journal(self, event: dict[str, Any]) -> None:
        self.journal.append(event)
        self.state.apply(event)

    def _budget_left(self, pages_in_flight: int) -> int:
        return self.config.scope.max_pages - self.state.pages() - pages_in_flight

    def _write_report(self) -> dict[str, Any]:
        this_run = dict(sorted(self.run_counts.items()))
        this_run["robots"] = self.robots_notes
        files = list_warc_files(self.out_dir, self.config.output.prefix)
        report = crawl_report(self.state, [name for name, _ in files],
                              len(self.frontier), this_run)
        write_text(os.path.join(self.out_dir, REPORT_NAME), json.dumps(report, indent=2) + "\n")
        return report


def _pages(in_flight: dict[Future, _Task]) -> int:
    return sum(1 for task in in_flight.values() if task.entry is not None)


def _decoded(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body without its Content-Encoding (gzip/deflate), for link extraction only."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        return b""
    try:
        return zlib.decompressobj(wbits).decompress(body, limit)
    except zlib.error:
        return b""


def _lock_directory(out_dir: str) -> int:
    """Hold an exclusive lock on the output directory: two crawls appending to one journal would
    interleave their state."""
    fd = os.open(os.path.join(out_dir, ".crawl.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"another crawl is writing to {out_dir}") from None
    return fd
