"""Language identification with py3langid (its model ships inside the package, so it runs
offline): the language code and a normalised probability for each document."""

from __future__ import annotations

from dataclasses import dataclass, field

from py3langid.langid import MODEL_FILE, LanguageIdentifier


@dataclass
class LanguageConfig:
    enabled: bool = True
    allowed: list[str] = field(default_factory=lambda: ["en"])  # empty list: every language
    min_score: float = 0.65  # FineWeb keeps English at fastText score >= 0.65


class LanguageClassifier:
    """`classify(text) -> (language, score)`; `reason(language, score)` says why one is dropped."""

    def __init__(self, allowed: list[str] | tuple[str, ...] = ("en",), min_score: float = 0.0):
        # py3langid 0.4 names the loader `from_model_file`; norm_probs gives scores in [0, 1]
        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.allowed = frozenset(allowed)
        self.min_score = min_score

    @classmethod
    def from_config(cls, config: LanguageConfig) -> LanguageClassifier:
        return cls(config.allowed, config.min_score)

    def classify(self, text: str) -> tuple[str, float]:
        language, score = self.identifier.classify(text)
        return language, float(score)

    def reason(self, language: str, score: float) -> str | None:
        if self.allowed and language not in self.allowed:
            return f"language:{language}"
        if score < self.min_score:
            return "language_score_below_min"
        return None
