"""URL canonicalisation and crawl scope: the one key every seen-set and frontier lookup uses."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from kiln.errors import UsageError

CRAWLABLE_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# WHATWG URL parsing drops ASCII tab and newline anywhere and trims C0 controls and spaces.
_STRIP_INSIDE = re.compile(r"[\t\n\r]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = "/%:@!$&'()*+,;=-._~?"


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The canonical absolute form of `url` (resolved against `base`), or None if not crawlable.

    Canonical means: scheme and host lower-cased, host IDNA-encoded, default port and userinfo
    dropped, dot segments removed, empty path -> "/", percent-escapes upper-cased with unreserved
    characters decoded, unsafe characters escaped, fragment removed. The query is kept in order:
    reordering parameters can change what a server returns.
    """
    url = _STRIP_INSIDE.sub("", url).strip(" \x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c"
                                             "\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19"
                                             "\x1a\x1b\x1c\x1d\x1e\x1f")
    if base is not None:
        url = urljoin(base, url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in CRAWLABLE_SCHEMES or not parts.hostname:
        return None
    host = _canonical_host(parts.hostname)
    if host is None:
        return None
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _fix_escapes(quote(remove_dot_segments(parts.path or "/"), safe=_PATH_SAFE))
    query = _fix_escapes(quote(parts.query, safe=_QUERY_SAFE))
    return urlunsplit((scheme, netloc, path or "/", query, ""))


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4: resolve "." and ".." segments of an absolute path."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def origin(url: str) -> str:
    """`scheme://host[:port]` of a canonical URL: the unit robots.txt and politeness apply to."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def path_and_query(url: str) -> str:
    """The request target of a canonical URL (what robots.txt rules match against)."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def in_scope(url: str, allowed_hosts: Iterable[str]) -> bool:
    """True when the URL's host is one of `allowed_hosts` (exact, case-insensitive)."""
    return host_of(url) in {h.lower().rstrip(".") for h in allowed_hosts}


def _canonical_host(hostname: str) -> str | None:
    host = unquote(hostname).lower().rstrip(".")
    if not host:
        return None
    if ":" in host:  # IPv6 literal; urlsplit has already removed the brackets
        return f"[{host}]"
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def normalize_escapes(text: str) -> str:
    """Escape non-ASCII and unsafe characters and canonicalise escapes, as `normalize_url` does."""
    return _fix_escapes(quote(text, safe=_QUERY_SAFE))


def _fix_escapes(text: str) -> str:
    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    return _ESCAPE.sub(fix, _BARE_PERCENT.sub("%25", text))


def parse_seeds(text: str, source: str) -> list[str]:
    """Seed URLs from a seeds file (one per line, `#` comments), canonical, without repeats.

    Raises UsageError naming the file and line of the first unusable entry.
    """
    seeds: dict[str, None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()  # a URL fragment would be dropped anyway
        if not line:
            continue
        url = normalize_url(line)
        if url is None:
            raise UsageError(f"{source}, line {number}: not an absolute http(s) URL: {line!r}")
        seeds.setdefault(url)
    if not seeds:
        raise UsageError(f"{source}: no seed URLs (one http(s) URL per line, '#' starts a comment)")
    return list(seeds)
