"""datatrove's quality filters (Gopher repetition and quality, C4, FineWeb) run per document in
plain code: one config dataclass per filter whose fields go to the datatrove constructor unchanged,
so the defaults below are datatrove's published ones and every threshold is tunable from YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    # [n, max fraction] pairs (YAML has no tuples; converted for datatrove)
    top_n_grams: list[list[float]] = field(
        default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    dup_n_grams: list[list[float]] = field(
        default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]])
    language: str = "eng"  # datatrove's Languages.english


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] | None = None
    language: str = "eng"  # datatrove's Languages.english


@dataclass
class C4QualityConfig:
    enabled: bool = True
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    language: str = "eng"  # datatrove's Languages.english


@dataclass
class FineWebQualityConfig:
    enabled: bool = True
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    stop_chars: list[str] | None = None
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3
    language: str = "eng"  # datatrove's Languages.english


@dataclass
class QualityConfig:
    """The filters in the order they run (FineWeb's order)."""

    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4_quality: C4QualityConfig = field(default_factory=C4QualityConfig)
    fineweb_quality: FineWebQualityConfig = field(default_factory=FineWebQualityConfig)


_CLASSES: dict[str, type[BaseFilter]] = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}


def constructor_kwargs(name: str, config: Any) -> dict[str, Any]:
    """The datatrove constructor arguments for one filter section (all fields but `enabled`)."""
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name != "enabled"}
    if name == "gopher_repetition":
        for key in ("top_n_grams", "dup_n_grams"):
            kwargs[key] = tuple((int(n), float(frac)) for n, frac in kwargs[key])
    if name == "fineweb_quality" and kwargs["stop_chars"] is not None:
        kwargs["stop_chars"] = tuple(kwargs["stop_chars"])
    return kwargs


def build_filters(config: QualityConfig) -> list[tuple[str, BaseFilter]]:
    """(ledger name, datatrove filter) for each enabled filter, in run order."""
    out = []
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if section.enabled:
            out.append((f.name, _CLASSES[f.name](**constructor_kwargs(f.name, section))))
    return out


@dataclass(frozen=True)
class QualityResult:
    text: str  # C4's filter drops lines, so the text that passes may be shorter
    passed: tuple[str, ...]
    reason: str | None  # `<filter>:<datatrove reason>` of the first filter that dropped it


class QualityFilters:
    """Runs each datatrove filter's per-document `filter(doc)` in order and stops at the first drop."""

    def __init__(self, config: QualityConfig) -> None:
        self.filters = build_filters(config)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.filters]

    def apply(self, text: str, doc_id: str = "", metadata: dict[str, Any] | None = None
              ) -> QualityResult:
        doc = Document(text=text, id=doc_id, metadata=dict(metadata or {}))
        passed: list[str] = []
        for name, step in self.filters:
            keep, reason = get_filter_result(step.filter(doc))
            if not keep:
                return QualityResult(doc.text, tuple(passed), f"{name}:{reason}" if reason else name)
            passed.append(name)
        return QualityResult(doc.text, tuple(passed), None)
