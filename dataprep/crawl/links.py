"""Link extraction from HTML: `<a>`/`<area>` hrefs resolved against the page (or its `<base>`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

from dataprep.crawl.urls import normalize_url

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_LINK_TAGS = ("a", "area")


@dataclass
class PageLinks:
    """The canonical outlinks of one page (in document order, without repeats)."""

    links: list[str] = field(default_factory=list)
    nofollow: bool = False  # `<meta name="robots" content="nofollow">`: the page asks us not to follow


def extract_links(body: bytes, page_url: str, content_type: str = "") -> PageLinks:
    """Outlinks of an HTML page. A page whose robots meta tag says nofollow yields none."""
    parser = _LinkParser()
    parser.feed(body.decode(sniff_charset(body, content_type), errors="replace"))
    parser.close()
    if parser.nofollow:
        return PageLinks([], nofollow=True)
    base = page_url
    if parser.base_href:
        base = normalize_url(parser.base_href, page_url) or page_url
    seen: dict[str, None] = {}
    for href in parser.hrefs:
        url = normalize_url(href, base)
        if url is not None:
            seen.setdefault(url)
    return PageLinks(list(seen))


def sniff_charset(body: bytes, content_type: str = "") -> str:
    """The page's encoding: the HTTP charset, else a `<meta charset>` near the top, else UTF-8."""
    for candidate in (_header_charset(content_type), _meta_charset(body[:4096])):
        if candidate and _known_codec(candidate):
            return candidate
    return "utf-8"


def media_type(content_type: str) -> str:
    """`text/html; charset=utf-8` -> `text/html`."""
    return content_type.split(";", 1)[0].strip().lower()


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.base_href: str | None = None
        self.nofollow = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag in _LINK_TAGS and values.get("href"):
            self.hrefs.append(values["href"])
        elif tag == "base" and self.base_href is None and values.get("href"):
            self.base_href = values["href"]
        elif tag == "meta" and values.get("name", "").lower() in ("robots", "llmkiln"):
            directives = {d.strip().lower() for d in values.get("content", "").split(",")}
            self.nofollow |= bool(directives & {"nofollow", "none"})

    handle_startendtag = handle_starttag


def _header_charset(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip("\"'") or None
    return None


def _meta_charset(head: bytes) -> str | None:
    match = _META_CHARSET.search(head)
    return match.group(1).decode("ascii") if match else None


def _known_codec(name: str) -> bool:
    try:
        "".encode(name)
    except LookupError:
        return False
    return True
