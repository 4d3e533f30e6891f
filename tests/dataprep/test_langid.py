"""Language identification with py3langid's packaged model."""

from dataprep.langid import LanguageClassifier, LanguageConfig
from tests.dataprep.corpus_text import ENGLISH, FRENCH


def test_classifies_with_normalised_scores():
    classifier = LanguageClassifier(["en"], 0.65)
    lang, score = classifier.classify(" ".join(ENGLISH))
    assert lang == "en" and 0.65 <= score <= 1.0
    lang, score = classifier.classify(" ".join(FRENCH))
    assert lang == "fr" and 0.0 <= score <= 1.0


def test_reasons_for_language_and_score():
    classifier = LanguageClassifier.from_config(LanguageConfig(allowed=["en", "de"], min_score=0.9))
    assert classifier.reason("en", 0.95) is None
    assert classifier.reason("fr", 0.99) == "language:fr"
    assert classifier.reason("de", 0.5) == "language_score_below_min"
    assert LanguageClassifier([], 0.0).reason("xh", 0.1) is None  # empty list allows all
