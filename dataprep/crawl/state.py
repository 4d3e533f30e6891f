"""Crawl state on disk: an fsync'd JSON-lines journal, its replay, and WARC tail recovery.

Write order per fetched URL: WARC transaction (write + fsync), then one journal line (write +
fsync) that marks the URL done and queues its new outlinks. A SIGKILL can therefore leave:
  * a torn last journal line -> dropped on load (one line is one event, so nothing half-applies);
  * a WARC transaction that no journal line covers -> recovered from the WARC tail (its metadata
    record carries depth, via and outlinks), so the URL is not fetched and archived twice;
  * a torn WARC transaction -> truncated away, and its URL is fetched again.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from warcio.archiveiterator import ArchiveIterator

from dataprep.crawl.warc import PageRecord, WarcLocation, list_warc_files
from kiln.log import get_logger

log = get_logger(__name__)

JOURNAL_NAME = "crawl-journal.jsonl"


@dataclass(frozen=True)
class FrontierEntry:
    url: str
    depth: int
    redirects: int = 0
    via: str = ""

    def to_json(self) -> list[Any]:
        return [self.url, self.depth, self.redirects, self.via]

    @classmethod
    def from_json(cls, item: list[Any]) -> FrontierEntry:
        return cls(str(item[0]), int(item[1]), int(item[2]), str(item[3]))


class Journal:
    """Append-only JSON lines; every append is flushed and fsync'd before it returns."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115

    def append(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event, separators=(",", ":")).encode("utf-8") + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def load_journal(path: str) -> list[dict[str, Any]]:
    """All complete events; a torn trailing line (a crash mid-append) is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    events: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good < len(data):
        log.warning("%s: dropping %d bytes of a torn last entry", path, len(data) - good)
        with open(path, "r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return events


@dataclass
class CrawlState:
    """The crawl so far, rebuilt from journal events: every queued URL and each one's outcome."""

    queued: dict[str, FrontierEntry] = field(default_factory=dict)  # insertion order = queue order
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    warc_ends: dict[str, int] = field(default_factory=dict)
    fetched: int = 0  # done URLs whose response is archived

    def apply(self, event: dict[str, Any]) -> None:
        for item in event.get("queued", ()):
            entry = FrontierEntry.from_json(item)
            self.queued.setdefault(entry.url, entry)
        if event.get("e") == "done":
            previous = self.done.get(event["url"])
            self.fetched += (event["outcome"] == "fetched") - (
                previous is not None and previous["outcome"] == "fetched")
            # The queued list is applied above; keeping it would hold every outlink in memory.
            self.done[event["url"]] = {k: v for k, v in event.items() if k != "queued"}
            if "warc" in event:
                self.warc_ends[event["warc"]] = max(self.warc_ends.get(event["warc"], 0),
                                                    event["end"])

    def pending(self) -> list[FrontierEntry]:
        return [e for url, e in self.queued.items() if url not in self.done]

    def pages(self) -> int:
        return self.fetched


def recover_warc_tails(directory: str, prefix: str,
                       warc_ends: dict[str, int]) -> list[tuple[PageRecord, WarcLocation]]:
    """Pages archived after the journal's last word on each WARC file; torn tails are truncated.

    A file holding nothing but its warcinfo record (the crawl died right after rotating) is
    removed, so every remaining file carries at least one page.
    """
    recovered: list[tuple[PageRecord, WarcLocation]] = []
    for name, _serial in list_warc_files(directory, prefix):
        path = os.path.join(directory, name)
        base = warc_ends.get(name, 0)
        with open(path, "rb") as f:
            f.seek(base)
            tail = f.read()
        pages, complete = _complete_transactions(tail, base, name)
        recovered.extend(pages)
        if base == 0 and not pages:
            log.warning("%s: no complete page record; removing it", path)
            os.unlink(path)
        elif base + complete < base + len(tail):
            log.warning("%s: truncating %d bytes of a torn record at offset %d",
                        path, len(tail) - complete, base + complete)
            with open(path, "r+b") as f:
                f.truncate(base + complete)
                os.fsync(f.fileno())
        if pages:
            log.info("%s: recovered %d archived page(s) the journal had not recorded",
                     path, len(pages))
    return recovered


def _complete_transactions(tail: bytes, base: int,
                           name: str) -> tuple[list[tuple[PageRecord, WarcLocation]], int]:
    """Walk gzip members; a transaction ends at a metadata (page) or warcinfo (file head) record."""
    pages: list[tuple[PageRecord, WarcLocation]] = []
    complete = 0
    txn_start = 0
    response: dict[str, Any] | None = None
    for start, end in _gzip_members(tail):
        record = next(iter(ArchiveIterator(io.BytesIO(tail[start:end]))), None)
        if record is None:
            break
        kind = record.rec_type
        if kind == "response":
            payload = record.raw_stream.read()
            response = {"status": int(record.http_headers.get_statuscode() or 0),
                        "size": len(payload),
                        "truncated": bool(record.rec_headers.get_header("WARC-Truncated"))}
        elif kind == "metadata" and response is not None:
            page = PageRecord.from_metadata(record.rec_headers.get_header("WARC-Target-URI"),
                                            record.raw_stream.read(), **response)
            pages.append((page, WarcLocation(name, base + txn_start, base + end)))
        if kind in ("metadata", "warcinfo"):
            complete = txn_start = end
            response = None
    return pages, complete


def _gzip_members(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each complete gzip member; stops at the first torn or corrupt one."""
    pos = 0
    while pos < len(data):
        inflater = zlib.decompressobj(wbits=31)
        try:
            inflater.decompress(memoryview(data)[pos:])
        except zlib.error:
            return
        if not inflater.eof:
            return
        end = len(data) - len(inflater.unused_data)
        yield pos, end
        pos = end
