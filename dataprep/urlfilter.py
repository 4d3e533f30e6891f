"""URL block list applied before extraction: blocked domains (and their subdomains) and banned
words among a URL's alphanumeric tokens, the way datatrove's URLFilter matches them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# A deliberately small default: the job's config carries the real lists for a production crawl.
DEFAULT_BANNED_WORDS = ("porn", "xxx", "sex", "casino", "escort", "viagra", "camgirl")

_TOKEN_SPLIT = re.compile(r"[^a-zA-Z0-9]+")


@dataclass
class URLFilterConfig:
    enabled: bool = True
    blocked_domains: list[str] = field(default_factory=list)  # "example.com" also blocks "a.example.com"
    banned_words: list[str] = field(default_factory=lambda: list(DEFAULT_BANNED_WORDS))


class URLBlockList:
    """`reason(url)` is None for an allowed URL, else `domain:<host>` or `word:<word>`."""

    def __init__(self, blocked_domains: Iterable[str] = (),
                 banned_words: Iterable[str] = DEFAULT_BANNED_WORDS) -> None:
        self.domains = {d.strip().lower().lstrip(".") for d in blocked_domains if d.strip()}
        self.words = {w.strip().lower() for w in banned_words if w.strip()}

    @classmethod
    def from_config(cls, config: URLFilterConfig) -> URLBlockList:
        return cls(config.blocked_domains, config.banned_words)

    def reason(self, url: str | None) -> str | None:
        if not url:
            return None
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        labels = host.split(".")
        for i in range(len(labels) - 1):
            suffix = ".".join(labels[i:])
            if suffix in self.domains:
                return f"domain:{suffix}"
        for token in _TOKEN_SPLIT.split(url.lower()):
            if token in self.words:
                return f"word:{token}"
        return None
