"""Tolerant WARC/WET/ARC record reading: every record comes out as an `ArchiveRecord` or a
`DeadLetter` naming the file, the record offset and the reason; a damaged file never ends the job.

Gzipped archives are first read member by member (offsets are real file offsets, as CDX indexes
use). Some writers put several records in one gzip member or split a record across members;
warcio refuses those. We then re-read the file as one decompressed stream, skip the records already
emitted and go on: offsets from that point are offsets in the decompressed stream, which the
record's `offset_in` says. A record whose bytes end before its Content-Length, and any unparseable
rest of a file, go to dead letters.
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
    """All records of one archive file, broken ones as dead letters; `open_file` opens it raw."""
    emitted = 0
    with open_file() as raw:
        head = raw.read(_SNIFF_BYTES)
        raw.seek(0)
        gzipped = head[:2] == _GZIP_MAGIC
        start = _decompressed_start(head) if gzipped else head
        if not start.startswith(_ARCHIVE_STARTS):
            # warcio would parse some text files as ARC records (a line with spaces looks like
            # an ARC header); an archive must open with a WARC version line or an ARC filedesc
            yield dead_letter(source, 0, f"not a WARC or ARC file: starts with {start[:40]!r}",
                              record=start if not gzipped else None, stage="read")
            return
        failure: tuple[int, str] | None = None
        for item in _records(raw, source, "file", 0, max_payload_bytes):
            if isinstance(item, _Failure):
                failure = (item.offset, item.reason)
                break
            if gzipped and isinstance(item, DeadLetter) and item.reason.startswith("truncated"):
                # a record cut at a gzip member boundary: re-read the stream as a whole
                failure = (item.offset or 0, item.reason)
                break
            emitted += 1
            yield item
    if failure is None:
        return
    if not gzipped:
        yield _rest_of_file(source, *failure)
        return
    log.warning("%s: %s at offset %d; re-reading as one decompressed gzip stream",
                source, failure[1].splitlines()[0], failure[0])
    with open_file() as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        for item in _records(stream, source, "decompressed", emitted, max_payload_bytes):
            if isinstance(item, _Failure):
                yield _rest_of_file(source, item.offset, item.reason, "decompressed")
                return
            yield item


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


def _rest_of_file(source: str, offset: int, reason: str, offset_in: str = "file") -> DeadLetter:
    first = " ".join(reason.split())[:300]
    return dead_letter(source, offset, f"unreadable from here to end of file ({offset_in} "
                       f"offset): {first}", stage="read")


def _records(stream: IO[bytes], source: str, offset_in: str, skip: int,
             max_payload_bytes: int) -> Iterator[ArchiveRecord | DeadLetter | _Failure]:
    """Parse `stream`; yields records/dead letters, then at most one `_Failure` and stops."""
    iterator = _QuietArchiveIterator(stream, arc2warc=False)
    warnings = 0
    index = 0
    offset = 0
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except _STREAM_ERRORS as exc:
            yield _Failure(offset, f"{type(exc).__name__}: {str(exc).strip() or 'no detail'}")
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
