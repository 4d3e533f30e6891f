"""Tolerant WARC/WET/ARC record reading: every record comes out as an `ArchiveRecord` or a
`DeadLetter` naming the file, the record offset and the reason; a damaged file never ends the job.

Gzipped archives are first read member by member (offsets are real file offsets, as CDX indexes
use). Some writers put several records in one gzip member or split a record across members;
warcio refuses those. We then re-read the file as one decompressed stream, skip the records already
emitted and go on: offsets from that point are offsets in the decompressed stream, which the
record's `offset_in` says. Damaged bytes (a corrupt gzip member, junk between records) become one
dead letter and reading resumes at the next gzip member or line that starts a WARC record. A record
whose bytes end before its Content-Length goes to dead letters; so does a file that is no archive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.recordloader import ArcWarcRecord
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from kiln.log import get_logger
from schemas.deadletter import DeadLetter, dead_letter

log = get_logger(__name__)

# Record types that carry a document: HTTP responses and WET text conversions (what datatrove's
# WarcReader reads); ARC files only have responses, which warcio names "response" too.
DOCUMENT_TYPES = ("response", "conversion")
_GZIP_MAGIC = b"\x1f\x8b"
_ARCHIVE_STARTS = (b"WARC/", b"filedesc://")
_SNIFF_BYTES = 4096
_SCAN_BYTES = 1 << 20
_GZIP_MEMBER = b"\x1f\x8b\x08"
_MANDATORY = ("WARC-Type", "WARC-Record-ID", "Content-Length")
_STREAM_ERRORS = (ArchiveLoadFailed, zlib.error, EOFError, OSError, ValueError, KeyError,
                  IndexError, UnicodeDecodeError)


@dataclass(frozen=True)
class ArchiveRecord:
    """One archive record: WARC headers we use and, for document types, the payload bytes."""

    source: str
    offset: int
    offset_in: str  # "file" (real byte offset) or "decompressed" (offset in the gunzipped stream)
    rec_type: str
    record_id: str | None
    url: str | None
    date: str | None
    content_type: str | None  # HTTP Content-Type for responses, WARC Content-Type otherwise
    identified_type: str | None  # WARC-Identified-Payload-Type when the crawler wrote one
    payload: bytes | None  # HTTP body (de-chunked, content-decoded) for DOCUMENT_TYPES only


def record_uid(record_id: str | None, url: str | None, date: str | None) -> str:
    """Stable document id: sha1 of the WARC-Record-ID, or of url + date when there is none."""
    key = record_id or f"{url or ''}\x00{date or ''}"
    return hashlib.sha1(key.encode("utf-8", errors="surrogatepass")).hexdigest()


def iter_archive(open_file: Callable[[], IO[bytes]], source: str,
                 max_payload_bytes: int = 50 << 20) -> Iterator[ArchiveRecord | DeadLetter]:
    """All records of one archive file, broken ones as dead letters; `open_file` opens it raw
    (seekable, not decompressed)."""
    emitted = 0
    with open_file() as raw:
        head = raw.read(_SNIFF_BYTES)
        gzipped = head[:2] == _GZIP_MAGIC
        start = _decompressed_start(head) if gzipped else head
        if not start.startswith(_ARCHIVE_STARTS):
            # warcio would parse some text files as ARC records (a line with spaces looks like
            # an ARC header); an archive must open with a WARC version line or an ARC filedesc
            yield dead_letter(source, 0, f"not a WARC or ARC file: starts with {start[:40]!r}",
                              record=start if not gzipped else None, stage="read")
            return
        position: int | None = 0
        while position is not None:
            raw.seek(position)
            failure = None
            for item in _records(raw, source, "file", 0, max_payload_bytes):
                if isinstance(item, _Failure):
                    failure = item
                    break
                if gzipped and isinstance(item, DeadLetter) and item.reason.startswith("truncated"):
                    failure = _Failure(item.offset or 0, item.reason, restream=True)
                    break
                emitted += 1
                yield item
            if failure is None:
                return
            if gzipped and position == 0 and failure.restream:
                break
            # skip the damaged bytes: resume at the next record (or gzip member) that parses
            position = _next_record_start(raw, failure.offset + 1, gzipped)
            until = f"offset {position}" if position is not None else "end of file"
            yield dead_letter(source, failure.offset, f"unreadable from file offset "
                              f"{failure.offset} to {until}: {_one_line(failure.reason)}",
                              stage="read")
        else:
            return
    # Several records in one gzip member, or a record split across members: warcio needs one
    # record per member, a gzip stream does not.
    log.warning("%s: %s at offset %d; re-reading as one decompressed gzip stream",
                source, _one_line(failure.reason), failure.offset)
    with open_file() as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        for item in _records(stream, source, "decompressed", emitted, max_payload_bytes):
            if isinstance(item, _Failure):
                yield dead_letter(source, item.offset, f"unreadable from decompressed offset "
                                  f"{item.offset} to end of file: {_one_line(item.reason)}",
                                  stage="read")
                return
            yield item


def _one_line(reason: str) -> str:
    return " ".join(reason.split())[:300]


def _next_record_start(raw: IO[bytes], start: int, gzipped: bool) -> int | None:
    """File offset of the next gzip member that decompresses to a WARC header, or of the next
    line that starts a WARC header; None when there is none."""
    marker = _GZIP_MEMBER if gzipped else b"\nWARC/1."
    chunk_start, tail = start, b""
    while True:
        raw.seek(chunk_start)
        chunk = raw.read(_SCAN_BYTES)
        if not chunk:
            return None
        data, base = tail + chunk, chunk_start - len(tail)
        found = data.find(marker)
        while found != -1:
            candidate = base + found + (0 if gzipped else 1)
            if _starts_record(raw, candidate, gzipped):
                return candidate
            found = data.find(marker, found + 1)
        tail = data[-(len(marker) - 1):]
        chunk_start += len(chunk)


def _starts_record(raw: IO[bytes], offset: int, gzipped: bool) -> bool:
    raw.seek(offset)
    head = raw.read(_SNIFF_BYTES)
    head = _decompressed_start(head) if gzipped else head
    return head.startswith((b"WARC/1.0\r\n", b"WARC/1.1\r\n"))


def _decompressed_start(head: bytes) -> bytes:
    try:
        return zlib.decompressobj(31).decompress(head)
    except zlib.error:
        return b""


class _QuietArchiveIterator(ArchiveIterator):
    # warcio prints this anomaly to stderr itself; we count it and log it with the file name
    INC_RECORD = ""


@dataclass(frozen=True)
class _Failure:
    offset: int
    reason: str
    restream: bool = False  # a gzip layout problem that reading the whole stream can fix


def _records(stream: IO[bytes], source: str, offset_in: str, skip: int,
             max_payload_bytes: int) -> Iterator[ArchiveRecord | DeadLetter | _Failure]:
    """Parse `stream`; yields records/dead letters, then at most one `_Failure` and stops."""
    iterator = _QuietArchiveIterator(stream, arc2warc=False)
    warnings = 0
    index = 0
    offset = iterator.offset
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except _STREAM_ERRORS as exc:
            message = str(exc).strip() or "no detail"
            yield _Failure(offset, f"{type(exc).__name__}: {message}",
                           restream="non-chunked gzip" in message)
            return
        offset = max(offset, iterator.offset)
        try:
            item = _convert(record, source, offset, offset_in, max_payload_bytes)
            iterator.read_to_end()
        except _STREAM_ERRORS as exc:
            yield _Failure(offset, f"{type(exc).__name__} in record: {str(exc).strip()}")
            return
        offset = max(offset, iterator.offset)
        if iterator.err_count > warnings:
            warnings = iterator.err_count
            log.warning("%s: bytes after the record at %s offset %d do not start a new record "
                        "(Content-Length may be wrong); reading on", source, offset_in, item.offset)
        index += 1
        if index > skip:
            yield item


def _convert(record: ArcWarcRecord, source: str, offset: int, offset_in: str,
             max_payload_bytes: int) -> ArchiveRecord | DeadLetter:
    headers = record.rec_headers
    rec_type = record.rec_type or "unknown"
    if record.format.startswith("warc"):
        # a header block cut short (truncated gzip member, junk) parses without these
        missing_headers = [h for h in _MANDATORY if headers.get_header(h) is None]
        if missing_headers:
            while record.raw_stream.read(1 << 16):
                pass
            return dead_letter(source, offset, f"malformed WARC record: no {missing_headers[0]} "
                               f"header ({offset_in} offset)", stage="read")
    payload = None
    if rec_type in DOCUMENT_TYPES:
        try:
            payload = record.content_stream().read(max_payload_bytes + 1)
        except (zlib.error, OSError, ValueError, EOFError) as exc:
            return dead_letter(source, offset, f"undecodable payload: {type(exc).__name__}: {exc}",
                               stage="read")
    while record.raw_stream.read(1 << 16):
        pass
    missing = getattr(record.raw_stream, "limit", 0)
    if missing:
        return dead_letter(source, offset, f"truncated record: Content-Length {record.length}, "
                           f"{missing} bytes missing ({offset_in} offset)",
                           record=payload, stage="read")
    if payload is not None and len(payload) > max_payload_bytes:
        return dead_letter(source, offset, f"payload over {max_payload_bytes} bytes",
                           stage="read")
    url = headers.get_header("WARC-Target-URI") or headers.get_header("uri")
    if url and url.startswith("<") and url.endswith(">"):
        url = url[1:-1]  # wget 1.20 wrote WARC/1.1-draft URIs in angle brackets
    content_type = (record.http_headers.get_header("Content-Type") if record.http_headers
                    else headers.get_header("Content-Type"))
    return ArchiveRecord(
        source=source, offset=offset, offset_in=offset_in, rec_type=rec_type,
        record_id=headers.get_header("WARC-Record-ID"), url=url,
        date=headers.get_header("WARC-Date") or headers.get_header("archive-date"),
        content_type=content_type,
        identified_type=headers.get_header("WARC-Identified-Payload-Type"),
        payload=payload)


def write_html_warc(path: str, pages: list[tuple[str, bytes]], *, gzip_records: bool = True,
                    date: str = "2026-01-01T00:00:00Z",
                    texts: list[tuple[str, str]] = ()) -> None:
    """Write a WARC of HTTP 200 text/html responses (and WET-style conversion records for
    `texts`), e.g. to turn a folder of pages into crawl-like input for tests and benchmarks."""
    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip_records)
        for url, body in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(body)))],
                                    protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                url, "response", payload=io.BytesIO(body), http_headers=http,
                warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": _uuid_for(url)}))
        for url, text in texts:
            writer.write_record(writer.create_warc_record(
                url, "conversion", payload=io.BytesIO(text.encode("utf-8")),
                warc_content_type="text/plain",
                warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": _uuid_for(url)}))


def _uuid_for(url: str) -> str:
    # stable ids, so a rebuilt file yields the same documents
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>"
