"""From archive records to text: pick the records that hold a document (HTML responses, WET
conversions) with datatrove's WarcReader rules, decode them, and extract main text from HTML with
datatrove's Trafilatura block in its per-document timeout sandbox (started from a fork server:
see `ForkserverSandbox`)."""

from __future__ import annotations

import multiprocessing
import platform
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox

from dataprep.warc import ArchiveRecord, record_uid

HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass
class ExtractConfig:
    favour_precision: bool = True  # datatrove's and FineWeb's setting
    timeout: float = 1.0  # seconds per document, enforced in a child process
    # trafilatura's `deduplicate` drops text segments that the same process has seen in earlier
    # documents (an LRU cache), so its output would depend on which worker saw what first; the
    # corpus is deduplicated by the dedup stages instead, deterministically
    deduplicate: bool = False


@dataclass(frozen=True)
class Selected:
    """A record that holds a document: its decoded content and whether it is HTML or WET text."""

    id: str
    url: str | None
    date: str | None
    source: str
    offset: int
    kind: str  # "html" or "text"
    content: str


def select_document(record: ArchiveRecord) -> Selected | str:
    """The decoded document, or the reason the record holds none (datatrove WarcReader's rules:
    response/conversion records, HTML by WARC-Identified-Payload-Type or else by libmagic, UTF-8
    or the charset cchardet detects)."""
    import cchardet
    import magic

    if record.rec_type not in ("response", "conversion") or record.payload is None:
        return f"record_type:{record.rec_type}"
    conversion = record.rec_type == "conversion"
    mime = record.identified_type or magic.from_buffer(record.payload, mime=True)
    if mime not in HTML_TYPES and not (conversion and mime == "text/plain"):
        return f"content_type:{mime}"
    try:
        content = record.payload.decode("utf-8")
    except UnicodeDecodeError:
        encoding = cchardet.detect(record.payload)["encoding"]
        if not encoding or encoding.lower() in ("utf-8", "utf8"):
            return "undecodable"
        try:
            content = record.payload.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            return "undecodable"
    return Selected(id=record_uid(record.record_id, record.url, record.date), url=record.url,
                    date=record.date, source=record.source, offset=record.offset,
                    kind="text" if conversion else "html", content=content)


class ExtractionTimeout(Exception):
    """Trafilatura did not finish within the per-document timeout."""


class ExtractionFailed(Exception):
    """The extractor process died on this document (out of memory, or trafilatura crashed)."""


def _serve(conn: Connection, extract_fn: Callable[[str], str], warmup_text: str) -> None:
    """The sandbox child: datatrove's `ExtractorSandbox._worker`, as a module-level function."""
    if platform.system() == "Linux":
        ExtractorSandbox.set_oom_score_adj(None, 1000)  # the kernel kills this one first
    extract_fn(warmup_text)
    conn.send(None)  # ready
    while True:
        try:
            text = conn.recv()
        except EOFError:
            break
        conn.send(extract_fn(text))


class ForkserverSandbox(ExtractorSandbox):
    """datatrove's sandbox with its child started from a fork server, not forked from here.

    Beam's SDK workers (Dataflow, Spark, the DirectRunner's multi-processing mode) run gRPC and
    logging threads; a child forked while one of them holds a lock can hang before its first
    document, which the parent sees as an extraction timeout. Measured here: one document in
    4 two-worker runs of the corpus test waited out the 120 s timeout that way, twice. The fork
    server is a fresh, single-threaded process that has imported this module (datatrove,
    trafilatura) once; children fork from it cheaply. Their start-up, the fork server's included,
    has its own limit: the per-document timeout (1 s by default) is for documents.
    """

    _context: Any = None
    startup_timeout = 60.0

    def _ensure_process(self, extract_fn: Callable[[str], str]) -> None:
        if self.process is not None and self.process.is_alive():
            return
        if self.process is not None:
            self._cleanup_process()
        ctx = ForkserverSandbox._context
        if ctx is None:
            ctx = ForkserverSandbox._context = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
        self.parent_conn, self.child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_serve, daemon=True,
                                   args=(self.child_conn, extract_fn, self.warmup_text))
        self.process.start()
        self.all_processes.append(self.process)
        limit = max(self.timeout, self.startup_timeout)
        if self.parent_conn.poll(limit):
            self.parent_conn.recv()  # ready
        else:
            self._cleanup_process()
            raise TimeoutError(f"extractor process not ready within {limit} s")


class TextExtractor:
    """`extract(html) -> str`: datatrove's Trafilatura in its timeout sandbox (a child process,
    started on first use and replaced when a document times out). Use as a context manager, or
    call `close()`, to stop the child."""

    def __init__(self, config: ExtractConfig) -> None:
        self.config = config
        self.trafilatura = Trafilatura(favour_precision=config.favour_precision,
                                       timeout=config.timeout, deduplicate=config.deduplicate)
        self._sandbox: ExtractorSandbox | None = None

    def extract(self, html: str) -> str:
        """Extracted text ('' when trafilatura finds none); raises ExtractionTimeout or
        ExtractionFailed."""
        if self._sandbox is None:
            self._sandbox = ForkserverSandbox(timeout=self.config.timeout, warmup_text="")
        try:
            text = self._sandbox.process_document(html, self.trafilatura.extract)
        except TimeoutError as exc:
            raise ExtractionTimeout(str(exc)) from None
        except EOFError as exc:  # the child died (OOM): the sandbox starts a new one next time
            raise ExtractionFailed(f"extractor process died: {exc}") from None
        return text or ""

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.__exit__(None, None, None)
            self._sandbox = None

    def __enter__(self) -> TextExtractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
