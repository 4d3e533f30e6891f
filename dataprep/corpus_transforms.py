"""Beam composites of the corpus job: archive files -> cleaned documents (each step a counted
ledger stage over the plain per-record functions of `dataprep`), and documents -> Parquet shards
written in a deterministic order (bucket by id, sorted within the shard)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import PCollection

from dataprep.extract import (
    ExtractConfig,
    ExtractionFailed,
    ExtractionTimeout,
    Selected,
    TextExtractor,
    select_document,
)
from dataprep.langid import LanguageClassifier, LanguageConfig
from dataprep.ledger_beam import Outcome, Stage
from dataprep.pii import PIIConfig, PIIRedactor
from dataprep.quality import QualityConfig, QualityFilters
from dataprep.urlfilter import URLBlockList, URLFilterConfig
from dataprep.warc import ArchiveRecord, iter_archive
from schemas.deadletter import dead_letter
from schemas.manifest import ShardEntry
from schemas.shards import to_table


@dataclass
class ReadConfig:
    max_payload_bytes: int = 50 << 20  # a larger record goes to dead letters unread


@dataclass
class CleanConfig:
    """Every per-record step of `CleanDocuments`, one section each."""

    read: ReadConfig = field(default_factory=ReadConfig)
    url_filter: URLFilterConfig = field(default_factory=URLFilterConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)


STAGES = ("read", "select", "url_filter", "extract", "language", "quality", "pii")


def _open_raw(path: str) -> Any:
    # gzip is detected from the bytes, not the name (".warc.gz.bad" files exist)
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


class ReadArchives:
    """Source stage: one archive path -> its records, broken ones as dead letters."""

    def __init__(self, config: ReadConfig) -> None:
        self.config = config

    def __call__(self, path: str) -> Iterator[Outcome]:
        try:
            for item in iter_archive(lambda: _open_raw(path), path,
                                     self.config.max_payload_bytes):
                yield Outcome.kept(item) if isinstance(item, ArchiveRecord) else Outcome.error(item)
        except OSError as exc:  # unreadable file: one dead letter for the whole file
            yield Outcome.error(dead_letter(path, 0, f"cannot open: {exc}"))


class SelectDocuments:
    """Keep HTML responses and WET conversions; anything else is filtered with its type."""

    def __call__(self, record: ArchiveRecord) -> Outcome:
        chosen = select_document(record)
        return Outcome.filtered(chosen) if isinstance(chosen, str) else Outcome.kept(chosen)


class FilterURLs:
    def __init__(self, config: URLFilterConfig) -> None:
        self.block_list = URLBlockList.from_config(config)

    def __call__(self, doc: Selected) -> Outcome:
        reason = self.block_list.reason(doc.url)
        return Outcome.filtered(reason) if reason else Outcome.kept(doc)


class ExtractText:
    """HTML -> main text with datatrove's Trafilatura (its sandbox lives for the DoFn's life)."""

    def __init__(self, config: ExtractConfig) -> None:
        self.config = config
        self.extractor: TextExtractor | None = None

    def setup(self) -> None:
        self.extractor = TextExtractor(self.config)

    def teardown(self) -> None:
        if self.extractor is not None:
            self.extractor.close()

    def __call__(self, doc: Selected) -> Outcome:
        if doc.kind == "text":
            text = doc.content  # WET conversions already are text
        else:
            if self.extractor is None:
                self.setup()
            try:
                text = self.extractor.extract(doc.content)
            except ExtractionTimeout:
                return Outcome.filtered("timeout")
            except ExtractionFailed as exc:
                return Outcome.error(dead_letter(doc.source, doc.offset, str(exc), doc.content))
        if not text.strip():
            return Outcome.filtered("no_text")
        return Outcome.kept({"id": doc.id, "url": doc.url, "date": doc.date, "text": text,
                             "source": doc.source, "filters": []})


class IdentifyLanguage:
    def __init__(self, config: LanguageConfig) -> None:
        self.config = config
        self.classifier: LanguageClassifier | None = None

    def setup(self) -> None:
        self.classifier = LanguageClassifier.from_config(self.config)

    def __call__(self, doc: dict[str, Any]) -> Outcome:
        if self.classifier is None:
            self.setup()
        language, score = self.classifier.classify(doc["text"])
        doc = {**doc, "language": language, "language_score": score}
        if self.config.enabled:
            reason = self.classifier.reason(language, score)
            if reason:
                return Outcome.filtered(reason)
            doc["filters"] = [*doc["filters"], "language"]
        return Outcome.kept(doc)


class FilterQuality:
    def __init__(self, config: QualityConfig) -> None:
        self.config = config
        self.filters: QualityFilters | None = None

    def setup(self) -> None:
        self.filters = QualityFilters(self.config)

    def __call__(self, doc: dict[str, Any]) -> Outcome:
        if self.filters is None:
            self.setup()
        result = self.filters.apply(doc["text"], doc["id"], {"url": doc["url"]})
        if result.reason:
            return Outcome.filtered(result.reason)
        return Outcome.kept({**doc, "text": result.text,
                             "filters": [*doc["filters"], *result.passed]})


class RedactPII:
    def __init__(self, config: PIIConfig) -> None:
        self.redactor = PIIRedactor(config)

    def __call__(self, doc: dict[str, Any]) -> Outcome:
        text, counts = self.redactor.redact(doc["text"])
        return Outcome.kept({**doc, "text": text},
                            stats={f"pii.{kind}": n for kind, n in counts.items()})


@dataclass
class CleanOutputs:
    documents: PCollection
    dead_letters: list[PCollection]
    counts: list[PCollection]


class CleanDocuments(beam.PTransform):
    """PCollection[archive path] -> cleaned document dicts; stages named as in `STAGES`."""

    def __init__(self, config: CleanConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, paths: PCollection) -> CleanOutputs:
        c = self.config
        url_fn = FilterURLs(c.url_filter) if c.url_filter.enabled else None
        steps = [("select", SelectDocuments()), ("url_filter", url_fn),
                 ("extract", ExtractText(c.extract)), ("language", IdentifyLanguage(c.language)),
                 ("quality", FilterQuality(c.quality)), ("pii", RedactPII(c.pii))]
        # one file per worker at a time; Reshuffle stops the runner fusing all reads into one
        read = (paths | "SpreadFiles" >> beam.Reshuffle()
                | "read" >> Stage("read", ReadArchives(c.read), source=True))
        dead, counts, pcoll = [read.dead_letters], [read.counts], read.kept
        for name, fn in steps:
            # a disabled URL filter still appears in the ledger, keeping everything
            out = pcoll | name >> Stage(name, fn if fn is not None else _keep)
            dead.append(out.dead_letters)
            counts.append(out.counts)
            pcoll = out.kept
        if url_fn is not None:
            pcoll = pcoll | "MarkURLFilter" >> beam.Map(_mark_url_filter)
        return CleanOutputs(pcoll, dead, counts)


def _keep(element: Any) -> Outcome:
    return Outcome.kept(element)


def _mark_url_filter(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "filters": ["url_filter", *doc["filters"]]}


def shard_of(doc_id: str, num_shards: int) -> int:
    """Bucket of a document: a hash of its id, so shard contents do not depend on the runner."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def shard_name(index: int, num_shards: int) -> str:
    return f"documents-{index:05d}-of-{num_shards:05d}.parquet"


def write_documents_shard(out: str, index: int, num_shards: int, docs: Iterable[dict[str, Any]],
                          row_group_rows: int = 4096) -> dict[str, Any]:
    """Write one zstd Parquet shard of the `documents` contract, rows sorted by id."""
    # (id, source, text): documents repeated across inputs still sort the same on every runner
    rows = sorted(docs, key=lambda d: (d["id"], d["source"], d["text"]))
    table = to_table(rows, "documents")
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=row_group_rows)
    data = buffer.getvalue()
    name = shard_name(index, num_shards)
    with FileSystems.create(FileSystems.join(out, name),
                            compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)
    entry = ShardEntry(path=name, rows=len(rows), bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest())
    return entry.__dict__


class WriteDocumentShards(beam.PTransform):
    """Documents -> `num_shards` Parquet files (empty buckets write no file) -> ShardEntry dicts."""

    def __init__(self, out: str, num_shards: int, row_group_rows: int = 4096) -> None:
        super().__init__()
        self.out, self.num_shards, self.row_group_rows = out, num_shards, row_group_rows

    def expand(self, docs: PCollection) -> PCollection:
        n, out, rows = self.num_shards, self.out, self.row_group_rows
        return (docs
                | "Bucket" >> beam.Map(lambda d: (shard_of(d["id"], n), d))
                | "Group" >> beam.GroupByKey()
                | "Write" >> beam.MapTuple(
                    lambda i, ds: write_documents_shard(out, i, n, ds, rows)))
