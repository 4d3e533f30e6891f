"""Record selection (datatrove WarcReader's rules, with reasons) and Trafilatura extraction."""

from __future__ import annotations

import pytest
from datatrove.pipeline.extractors import Trafilatura

from dataprep.extract import (
    ExtractConfig,
    ExtractionTimeout,
    Selected,
    TextExtractor,
    select_document,
)
from dataprep.warc import ArchiveRecord, record_uid
from tests.dataprep.corpus_text import ENGLISH, html


def record(rec_type="response", payload=b"<html><body><p>hi</p></body></html>", identified=None):
    return ArchiveRecord(source="f.warc", offset=7, offset_in="file", rec_type=rec_type,
                         record_id="<urn:uuid:1>", url="https://a.example/", date="2026-01-01",
                         content_type="text/html", identified_type=identified, payload=payload)


def test_select_keeps_html_responses_and_wet_conversions():
    chosen = select_document(record())
    assert isinstance(chosen, Selected) and chosen.kind == "html"
    assert chosen.id == record_uid("<urn:uuid:1>", None, None) and chosen.offset == 7
    wet = select_document(record("conversion", b"plain words here"))
    assert isinstance(wet, Selected) and wet.kind == "text" and wet.content == "plain words here"


def test_select_gives_a_reason_for_everything_else():
    assert select_document(record("request", None)) == "record_type:request"
    assert select_document(record(payload=b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")) == \
        "content_type:image/gif"
    assert select_document(record(identified="application/pdf")) == "content_type:application/pdf"


def test_select_decodes_legacy_charsets():
    latin1 = "<html><body><p>Crème brûlée à la façon de grand-mère, très réussie.</p></body></html>"
    chosen = select_document(record(payload=latin1.encode("latin-1")))
    assert isinstance(chosen, Selected) and "brûlée" in chosen.content


def test_extractor_matches_datatrove_trafilatura_step():
    page = html("Baking bread", ENGLISH).decode()
    with TextExtractor(ExtractConfig(timeout=30)) as extractor:
        text = extractor.extract(page)
    reference = Trafilatura(favour_precision=True, timeout=30, deduplicate=False).extract(page)
    assert text == reference and "Bread has been baked" in text and "Site footer" not in text


def test_extractor_returns_empty_text_for_a_page_without_content():
    with TextExtractor(ExtractConfig(timeout=30)) as extractor:
        assert extractor.extract("<html><body></body></html>") == ""


def test_extractor_times_out_per_document():
    page = html("Long", ENGLISH * 400).decode()
    with TextExtractor(ExtractConfig(timeout=0.01)) as extractor, pytest.raises(ExtractionTimeout):
        extractor.extract(page)


def test_extraction_does_not_depend_on_earlier_documents():
    page = html("Baking bread", ENGLISH).decode()
    with TextExtractor(ExtractConfig(timeout=30)) as extractor:
        first = extractor.extract(page)
        assert extractor.extract(page) == first  # trafilatura's cross-document cache is off
