"""The tolerant archive reader on real (and deliberately broken) WARC/ARC files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from dataprep.warc import ArchiveRecord, iter_archive, record_uid, write_html_warc
from schemas.deadletter import DeadLetter

SAMPLES = Path(__file__).resolve().parents[2] / "jobs" / "sample_data" / "warc"


def read(path: Path) -> tuple[list[ArchiveRecord], list[DeadLetter]]:
    items = list(iter_archive(lambda: open(path, "rb"), str(path)))
    records = [i for i in items if isinstance(i, ArchiveRecord)]
    dead = [i for i in items if isinstance(i, DeadLetter)]
    assert len(records) + len(dead) == len(items)
    return records, dead


def test_every_shared_sample_is_read_or_dead_lettered():
    files = sorted(p for p in SAMPLES.iterdir() if not p.name.startswith("LICENSE"))
    assert len(files) == 7
    for path in files:
        records, dead = read(path)
        assert records or dead, path
        for entry in dead:
            assert entry.source == str(path) and entry.reason and entry.offset is not None


def test_single_gzip_member_file_is_recovered_by_stream_reading():
    # example-bad.warc.gz.bad holds several records in one gzip member: warcio refuses it
    records, dead = read(SAMPLES / "example-bad.warc.gz.bad")
    assert dead == []
    assert [r.rec_type for r in records] == ["warcinfo", "response", "request", "revisit",
                                             "request", "response"]
    assert records[0].offset_in == "file" and records[1].offset_in == "decompressed"
    assert records[1].url == "http://example.com?example=1" and len(records[1].payload) == 1270


def test_record_split_across_gzip_members_is_recovered():
    records, dead = read(SAMPLES / "example-wrong-chunks.warc.gz")
    assert dead == []
    assert [r.rec_type for r in records] == ["response", "request"]
    assert records[0].payload.startswith(b"<!doctype html>") and len(records[0].payload) == 1270


def test_wget_angle_bracket_target_uri_is_unwrapped():
    records, _ = read(SAMPLES / "example-wget-bad-target-uri.warc.gz")
    response = next(r for r in records if r.rec_type == "response")
    assert response.url == "http://example.com/"


def test_junk_after_a_record_is_logged_and_reading_goes_on(caplog):
    records, dead = read(SAMPLES / "example-trunc.warc")
    assert dead == [] and [r.rec_type for r in records][-2:] == ["response", "request"]
    assert "do not start a new record" in caplog.text


def test_non_archive_files_are_dead_lettered_whole(tmp_path):
    records, dead = read(SAMPLES / "LICENSE-warcio-test-data")
    assert records == [] and len(dead) == 1 and "not a WARC or ARC file" in dead[0].reason
    assert dead[0].record.lstrip().startswith("Version 2.0, January 2004")
    gz = tmp_path / "notes.txt.gz"
    gz.write_bytes(gzip.compress(b"just some text\n"))
    records, dead = read(gz)
    assert records == [] and dead[0].offset == 0


def test_truncated_gzip_keeps_earlier_records_and_dead_letters_the_rest(tmp_path):
    data = (SAMPLES / "example.warc.gz").read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[:2700])  # inside the revisit record's gzip member at 2621
    records, dead = read(cut)
    assert [r.rec_type for r in records] == ["warcinfo", "warcinfo", "response", "request"]
    # the cut member still yields the start of a header block: it names what is missing
    assert len(dead) == 1 and dead[0].offset == 2621
    assert dead[0].reason.startswith("malformed WARC record: no WARC-Type")


def test_truncated_uncompressed_record_is_dead_lettered(tmp_path):
    data = (SAMPLES / "example-iana.org-chunked.warc").read_bytes()
    cut = tmp_path / "cut.warc"
    cut.write_bytes(data[:3000])  # inside the response at offset 405
    records, dead = read(cut)
    assert [r.rec_type for r in records] == ["warcinfo"]
    assert len(dead) == 1 and dead[0].offset == 405 and dead[0].reason.startswith("truncated")


def test_garbage_between_records_is_skipped_to_the_next_record(tmp_path):
    data = (SAMPLES / "example-iana.org-chunked.warc").read_bytes()
    garbage = b"this is not a record header\r\n\r\n"
    bad = tmp_path / "garbage.warc"
    bad.write_bytes(data[:405] + garbage + data[405:])
    records, dead = read(bad)
    assert [r.rec_type for r in records] == ["warcinfo", "response", "request"]
    assert records[1].offset == 405 + len(garbage) and len(records[1].payload) == 7223
    assert len(dead) == 1 and dead[0].offset == 405
    assert dead[0].reason.startswith(f"unreadable from file offset 405 to offset {405 + len(garbage)}")


def test_corrupt_gzip_member_is_skipped_to_the_next_member(tmp_path):
    data = bytearray((SAMPLES / "example.warc.gz").read_bytes())
    data[1000:1040] = bytes(40)  # inside the response's member (784..2012)
    bad = tmp_path / "corrupt.warc.gz"
    bad.write_bytes(bytes(data))
    records, dead = read(bad)
    assert [(r.rec_type, r.offset) for r in records] == [
        ("warcinfo", 0), ("warcinfo", 353), ("request", 2012), ("revisit", 2621),
        ("request", 3207)]
    assert len(dead) == 1 and dead[0].offset == 784 and "to offset 2012" in dead[0].reason


def test_written_warc_round_trips_with_stable_ids(tmp_path):
    pages = [("https://a.example/x", b"<html><body><p>x</p></body></html>")]
    for name in ("one.warc.gz", "two.warc.gz"):
        write_html_warc(str(tmp_path / name), pages, texts=[("https://a.example/t", "plain")])
    one, _ = read(tmp_path / "one.warc.gz")
    two, _ = read(tmp_path / "two.warc.gz")
    assert [r.rec_type for r in one] == ["response", "conversion"]
    assert [r.record_id for r in one] == [r.record_id for r in two]
    assert one[1].payload == b"plain"


def test_record_uid_prefers_record_id_and_falls_back_to_url_and_date():
    assert record_uid("<urn:uuid:1>", "u", "d") == record_uid("<urn:uuid:1>", "v", "e")
    assert record_uid(None, "u", "d") != record_uid(None, "u", "e")
    assert len(record_uid(None, None, None)) == 40


@pytest.mark.parametrize("name", ["example.warc.gz", "example-iana.org-chunked.warc"])
def test_offsets_are_real_file_offsets(tmp_path, name):
    records, _ = read(SAMPLES / name)
    data = (SAMPLES / name).read_bytes()
    for r in records:
        chunk = data[r.offset:r.offset + 64]
        head = gzip.decompress(data[r.offset:])[:5] if name.endswith(".gz") else chunk[:5]
        assert head == b"WARC/"
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_arc_files_are_read_with_url_and_date_ids(tmp_path):
    body = b"<html><body><p>An ARC page about bread, written long ago.</p></body></html>"
    http = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)
    desc = b"1 0 Alexa Internet\nURL IP-address Archive-date Content-type Archive-length\n"
    arc = (b"filedesc://example.arc 0.0.0.0 20140216050221 text/plain %d\n%s\n" % (len(desc), desc)
           + b"http://example.com/ 93.184.216.119 20140216050221 text/html %d\n%s\n" % (
               len(http), http))
    path = tmp_path / "example.arc.gz"
    path.write_bytes(gzip.compress(arc))
    records, dead = read(path)
    assert dead == [] and [r.rec_type for r in records] == ["arc_header", "response"]
    page = records[1]
    assert (page.url, page.date, page.record_id, page.payload) == (
        "http://example.com/", "20140216050221", None, body)
