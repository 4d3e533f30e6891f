"""From archive records to text: pick the records that hold a document (HTML responses, WET
conversions) with datatrove's WarcReader rules, decode them, and extract main text from HTML with
datatrove's Trafilatura block and its per-document timeout sandbox."""

from __future__ import annotations

from dataclasses import dataclass

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
            self._sandbox = ExtractorSandbox(timeout=self.config.timeout, warmup_text="")
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
