"""datatrove's quality filters behind config dataclasses: defaults, reasons, switches."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from datatrove.data import Document

from dataprep.quality import (
    _CLASSES,
    QualityConfig,
    QualityFilters,
    build_filters,
    constructor_kwargs,
)
from tests.dataprep.corpus_text import ENGLISH


@pytest.mark.parametrize("name", list(_CLASSES))
def test_config_defaults_are_datatroves_published_defaults(name):
    section = getattr(QualityConfig(), name)
    params = inspect.signature(_CLASSES[name].__init__).parameters
    ours = constructor_kwargs(name, section)
    assert set(ours) == {p for p in params if p not in ("self", "exclusion_writer", "batch_size")}
    for key, value in ours.items():
        assert value == params[key].default, (name, key)


def test_good_prose_passes_every_filter():
    result = QualityFilters(QualityConfig()).apply("\n".join(ENGLISH))
    assert result.reason is None
    assert result.passed == ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def test_reason_is_filter_name_and_datatrove_reason():
    two_sentences = ENGLISH[0].rsplit(". ", 1)[0] + "."  # 35 words: Gopher wants 50
    result = QualityFilters(QualityConfig()).apply(two_sentences)
    assert result.reason == "gopher_quality:gopher_short_doc"
    assert result.passed == ("gopher_repetition",)


def test_filters_agree_with_datatrove_run_on_each_document():
    """Our per-document calls give what datatrove's own BaseFilter.run keeps and drops."""
    texts = ["\n".join(ENGLISH), "\n".join(ENGLISH) + "\nvar x = { a: 1 };",
             "\n".join(ENGLISH * 3), "word " * 200, "\n".join(ENGLISH[:1])]
    ours = QualityFilters(QualityConfig())
    for text in texts:
        docs, dropped_by = [Document(text=text, id="x")], None
        for name, step in build_filters(QualityConfig()):
            docs = list(step.run(iter(docs)))
            if not docs:
                dropped_by = name
                break
        result = ours.apply(text)
        assert (result.reason or "").split(":")[0] == (dropped_by or ""), text[:40]
        if dropped_by is None:
            assert result.text == docs[0].text


def test_disabled_filter_is_skipped_and_thresholds_are_passed_through():
    config = QualityConfig()
    config.gopher_quality = dataclasses.replace(config.gopher_quality, min_doc_words=1000)
    assert QualityFilters(config).apply("\n".join(ENGLISH)).reason == \
        "gopher_quality:gopher_short_doc"
    config.gopher_quality = dataclasses.replace(config.gopher_quality, enabled=False)
    assert "gopher_quality" not in QualityFilters(config).names


def test_c4_line_removal_changes_the_text():
    text = "\n".join(ENGLISH) + "\nClick here to enable javascript in your browser now."
    result = QualityFilters(QualityConfig()).apply(text)
    assert result.reason is None and "javascript" not in result.text
