"""Crawl state on disk: journal replay, torn lines, WARC rotation and crash-tail recovery."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator

from dataprep.crawl.fetch import Exchange
from dataprep.crawl.state import (
    CrawlState,
    FrontierEntry,
    Journal,
    load_journal,
    recover_warc_tails,
)
from dataprep.crawl.warc import PageRecord, WarcFileWriter, list_warc_files


def _exchange(url: str, body: bytes) -> Exchange:
    request = b"GET / HTTP/1.1\r\nHost: site.example\r\nUser-Agent: llmkiln/t\r\n\r\n"
    headers = [("Content-Type", "text/html"), ("Content-Length", str(len(body)))]
    return Exchange(url, "93.184.215.14", request, 200, "OK", "HTTP/1.1", headers, body, False,
                    datetime.now(UTC))


def _page(n: int) -> tuple[PageRecord, Exchange]:
    url = f"http://site.example/p{n}.html"
    body = f"<html>page {n:04d}</html>".encode()
    page = PageRecord(url, depth=n % 3, via="http://site.example/", status=200, size=len(body),
                      outlinks=[f"http://site.example/p{n + 10}.html", "http://other.example/"])
    return page, _exchange(url, body)


def _records(path: Path) -> list[tuple[str, str, int]]:
    out = []
    with open(path, "rb") as f:
        it = ArchiveIterator(f, check_digests=True)
        for record in it:
            record.content_stream().read()
            assert record.digest_checker.passed is not False
            out.append((record.rec_type, record.rec_headers.get_header("WARC-Target-URI"),
                        it.get_record_offset()))
    return out


def test_journal_replays_and_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = str(tmp_path / "j.jsonl")
    journal = Journal(path)
    journal.append({"e": "queue", "queued": [["http://a/", 0, 0, ""], ["http://a/b", 0, 0, ""]]})
    journal.append({"e": "done", "url": "http://a/", "outcome": "fetched", "status": 200,
                    "depth": 0, "bytes": 5, "warc": "x.warc.gz", "end": 900,
                    "queued": [["http://a/c", 1, 0, "http://a/"]]})
    journal.close()
    good_size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b'{"e":"done","url":"http://a/b","outc')  # SIGKILL mid-append
    state = CrawlState()
    for event in load_journal(path):
        state.apply(event)
    assert os.path.getsize(path) == good_size  # the torn bytes are gone for the next append
    assert [e.url for e in state.pending()] == ["http://a/b", "http://a/c"]
    assert state.pages() == 1 and state.warc_ends == {"x.warc.gz": 900}
    assert state.queued["http://a/c"] == FrontierEntry("http://a/c", 1, 0, "http://a/")


def test_warc_files_rotate_and_every_record_points_at_its_warcinfo(tmp_path: Path) -> None:
    writer = WarcFileWriter(str(tmp_path), "kiln", max_bytes=1, user_agent="llmkiln/t")
    for n in range(3):
        writer.write_page(*_page(n), fetch_ms=1)
    writer.close()
    names = [name for name, _ in list_warc_files(str(tmp_path), "kiln")]
    assert [name[-13:] for name in names] == ["00001.warc.gz", "00002.warc.gz", "00003.warc.gz"]
    for name in names:
        with open(tmp_path / name, "rb") as f:
            records = list(ArchiveIterator(f))
            assert [r.rec_type for r in records] == ["warcinfo", "response", "request", "metadata"]
        info_id = records[0].rec_headers.get_header("WARC-Record-ID")
        assert all(r.rec_headers.get_header("WARC-Warcinfo-ID") == info_id for r in records[1:])
    again = WarcFileWriter(str(tmp_path), "kiln", 1 << 30, "llmkiln/t")  # a resumed run
    again.write_page(*_page(9), fetch_ms=1)
    again.close()
    assert list_warc_files(str(tmp_path), "kiln")[-1][1] == 4  # never reuses a serial


def test_recovery_keeps_unjournaled_complete_pages_and_cuts_torn_tails(tmp_path: Path) -> None:
    writer = WarcFileWriter(str(tmp_path), "kiln", 1 << 30, "llmkiln/t")
    journaled = writer.write_page(*_page(1), fetch_ms=1)
    writer.write_page(*_page(2), fetch_ms=1)  # archived, then killed before the journal line
    before_torn = writer.write_page(*_page(3), fetch_ms=1).offset
    writer.close()
    path = tmp_path / journaled.file
    # Page 3 lost its metadata record (killed mid-write); then a half-written gzip member.
    metadata_offset = [off for kind, url, off in _records(path)
                       if kind == "metadata" and url.endswith("p3.html")][0]
    with open(path, "r+b") as f:
        f.truncate(metadata_offset)
        f.seek(0, os.SEEK_END)
        f.write(b"\x1f\x8b\x08\x00garbage-from-a-torn-member")

    recovered = recover_warc_tails(str(tmp_path), "kiln", {journaled.file: journaled.end})

    assert [page.url for page, _ in recovered] == ["http://site.example/p2.html"]
    page, location = recovered[0]
    assert (page.depth, page.via, page.status, page.size) == (2, "http://site.example/", 200, 22)
    assert page.outlinks == ["http://site.example/p12.html", "http://other.example/"]
    assert location.offset == journaled.end and location.end == before_torn
    assert os.path.getsize(path) == before_torn
    assert [url for kind, url, _ in _records(path) if kind == "response"] == [
        "http://site.example/p1.html", "http://site.example/p2.html"]


def test_recovery_removes_a_file_that_holds_only_its_warcinfo(tmp_path: Path) -> None:
    writer = WarcFileWriter(str(tmp_path), "kiln", 1 << 30, "llmkiln/t")
    writer.write_page(*_page(1), fetch_ms=1)
    writer.close()
    name = list_warc_files(str(tmp_path), "kiln")[0][0]
    with open(tmp_path / name, "r+b") as f:
        records = _records(tmp_path / name)
        f.truncate(records[1][2] + 10)  # warcinfo plus the first bytes of the response
    assert recover_warc_tails(str(tmp_path), "kiln", {}) == []
    assert list_warc_files(str(tmp_path), "kiln") == []


def test_recovery_leaves_other_crawls_warc_files_alone(tmp_path: Path) -> None:
    other = WarcFileWriter(str(tmp_path), "theirs", 1 << 30, "llmkiln/t")
    other.write_page(*_page(1), fetch_ms=1)
    other.close()
    (tmp_path / "theirs-20200101000000-00009.warc.gz").write_bytes(b"not even gzip")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert recover_warc_tails(str(tmp_path), "kiln", {}) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_recovery_is_a_no_op_on_a_fully_journaled_file(tmp_path: Path) -> None:
    writer = WarcFileWriter(str(tmp_path), "kiln", 1 << 30, "llmkiln/t")
    location = writer.write_page(*_page(1), fetch_ms=1)
    writer.close()
    assert recover_warc_tails(str(tmp_path), "kiln", {location.file: location.end}) == []
    assert os.path.getsize(tmp_path / location.file) == location.end


def test_warc_1_0_output_has_second_precision_dates(tmp_path: Path) -> None:
    writer = WarcFileWriter(str(tmp_path), "kiln", 1 << 30, "llmkiln/t", warc_version="1.0")
    location = writer.write_page(*_page(1), fetch_ms=1)
    writer.close()
    with open(tmp_path / location.file, "rb") as f:
        records = list(ArchiveIterator(f))
    assert {r.rec_headers.protocol for r in records} == {"WARC/1.0"}
    date = records[1].rec_headers.get_header("WARC-Date")
    assert len(date) == len("2026-01-01T00:00:00Z") and date.endswith("Z")
