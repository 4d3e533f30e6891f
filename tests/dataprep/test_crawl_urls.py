"""URL canonicalisation, seeds files and link extraction."""

from __future__ import annotations

import re
from urllib.parse import urljoin

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataprep.crawl.links import extract_links, sniff_charset
from dataprep.crawl.urls import (
    in_scope,
    normalize_url,
    origin,
    parse_seeds,
    path_and_query,
    remove_dot_segments,
)
from kiln.errors import UsageError


@pytest.mark.parametrize("raw, expected", [
    ("HTTP://Example.COM", "http://example.com/"),
    ("http://example.com:80/a", "http://example.com/a"),
    ("https://example.com:443/a", "https://example.com/a"),
    ("https://example.com:8443/a", "https://example.com:8443/a"),
    ("http://example.com/a/./b/../c", "http://example.com/a/c"),
    ("http://example.com/a#frag", "http://example.com/a"),
    ("http://user:pw@example.com/", "http://example.com/"),
    ("http://example.com/%7euser/%2f", "http://example.com/~user/%2F"),
    ("http://example.com/a b?q=1 2", "http://example.com/a%20b?q=1%202"),
    ("http://example.com/100%", "http://example.com/100%25"),
    ("http://example.com/caf\u00e9", "http://example.com/caf%C3%A9"),
    ("http://b\u00fccher.example/", "http://xn--bcher-kva.example/"),
    ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ("  http://example.com/\n\ta  ", "http://example.com/a"),
    ("http://example.com/?b=2&a=1", "http://example.com/?b=2&a=1"),
    ("http://example.com.", "http://example.com/"),
])
def test_normalize_url_canonical_forms(raw: str, expected: str) -> None:
    assert normalize_url(raw) == expected
    assert normalize_url(expected) == expected  # canonical form is a fixed point


@pytest.mark.parametrize("raw", [
    "mailto:a@example.com", "javascript:void(0)", "ftp://example.com/", "data:text/html,hi",
    "http://", "http://example.com:99999/", "/relative/without/base", "",
])
def test_normalize_url_rejects_uncrawlable(raw: str) -> None:
    assert normalize_url(raw) is None


def test_normalize_url_resolves_relative_links() -> None:
    base = "http://example.com/docs/api/fs.html"
    assert normalize_url("path.html#x", base) == "http://example.com/docs/api/path.html"
    assert normalize_url("../guide/", base) == "http://example.com/docs/guide/"
    assert normalize_url("//other.org/x", base) == "http://other.org/x"
    assert normalize_url("?q=1", base) == "http://example.com/docs/api/fs.html?q=1"
    assert normalize_url("#top", base) == "http://example.com/docs/api/fs.html"


@pytest.mark.parametrize("ref", ["g", "./g", "g/", "/g", "?y", "g?y", "#s", "g#s", ";x", "g;x",
                                 "", ".", "./", "..", "../", "../g", "../..", "../../",
                                 "../../g", "../../../g", "/./g", "/../g", "g.", ".g", "g..",
                                 "..g", "./../g", "./g/.", "g/./h", "g/../h", "g;x=1/./y",
                                 "g;x=1/../y"])
def test_dot_segment_removal_matches_rfc3986_examples(ref: str) -> None:
    # RFC 3986 section 5.4 reference resolution; urljoin implements the RFC and is the reference.
    base = "http://a/b/c/d;p?q"
    expected = urljoin(base, ref).split("#")[0]
    assert normalize_url(ref, base) == normalize_url(expected)


def test_remove_dot_segments_never_climbs_above_root() -> None:
    assert remove_dot_segments("/../../a") == "/a"
    assert remove_dot_segments("/a/b/..") == "/a/"
    assert remove_dot_segments("/a/.") == "/a/"


def test_origin_scope_and_request_target() -> None:
    url = normalize_url("http://Docs.Example.com:8080/a/b?x=1#f")
    assert url is not None
    assert origin(url) == "http://docs.example.com:8080"
    assert path_and_query(url) == "/a/b?x=1"
    assert in_scope(url, ["DOCS.example.com."])
    assert not in_scope(url, ["example.com"])  # subdomains are not implied


def test_parse_seeds_skips_comments_and_repeats() -> None:
    text = "# my seeds\n\nhttp://a.example/  # home\nHTTP://A.EXAMPLE/\nhttps://b.example/x\n"
    assert parse_seeds(text, "seeds.txt") == ["http://a.example/", "https://b.example/x"]


@pytest.mark.parametrize("text, message", [
    ("# nothing here\n\n", "seeds.txt: no seed URLs"),
    ("http://ok.example/\nftp://files.example/\n", "seeds.txt, line 2: not an absolute http(s) URL"),
    ("www.example.com\n", "seeds.txt, line 1"),
])
def test_parse_seeds_names_file_and_line_of_bad_entries(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_seeds(text, "seeds.txt")


def test_extract_links_resolves_dedups_and_keeps_document_order() -> None:
    html = b"""<html><head><title>t</title></head><body>
      <a href="b.html">b</a> <a href="a.html#sec">a</a> <a href="b.html#other">again</a>
      <a href="mailto:x@y.z">mail</a> <a>no href</a> <A HREF="/abs">abs</A>
      <map><area href="area.html"></map> <link href="style.css" rel="stylesheet">
      <a href="https://elsewhere.example/x">ext</a></body></html>"""
    links = extract_links(html, "http://site.example/dir/index.html").links
    assert links == ["http://site.example/dir/b.html", "http://site.example/dir/a.html",
                     "http://site.example/abs", "http://site.example/dir/area.html",
                     "https://elsewhere.example/x"]


def test_extract_links_uses_base_href() -> None:
    html = b'<head><base href="http://cdn.example/root/"></head><a href="p.html">p</a>'
    assert extract_links(html, "http://site.example/x/y.html").links == [
        "http://cdn.example/root/p.html"]


def test_extract_links_honours_meta_robots_nofollow() -> None:
    html = b'<meta name="ROBOTS" content="noindex, NoFollow"><a href="p.html">p</a>'
    page = extract_links(html, "http://site.example/")
    assert page.nofollow and page.links == []


def test_extract_links_decodes_with_declared_charset() -> None:
    html = '<meta charset="iso-8859-1"><a href="caf\u00e9.html">x</a>'.encode("latin-1")
    assert sniff_charset(html) == "iso-8859-1"
    assert extract_links(html, "http://s.example/").links == ["http://s.example/caf%C3%A9.html"]
    header_wins = extract_links(html, "http://s.example/", "text/html; charset=utf-8").links
    assert header_wins == ["http://s.example/caf%EF%BF%BD.html"]  # undecodable byte -> U+FFFD
    assert sniff_charset(b"<meta charset=bogus-enc>") == "utf-8"


_segment = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                   max_size=8)


@settings(max_examples=100, deadline=None)
@given(scheme=st.sampled_from(["http", "HTTPS", "hTTp"]),
       host=st.sampled_from(["example.com", "EXAMPLE.org", "b\u00fccher.example", "127.0.0.1",
                             "[::1]", "a-b.example."]),
       port=st.sampled_from(["", ":80", ":443", ":8080"]),
       segments=st.lists(_segment, max_size=5),
       query=st.one_of(st.none(), _segment), fragment=st.one_of(st.none(), _segment))
def test_normalize_url_is_idempotent_and_ascii(scheme: str, host: str, port: str,
                                               segments: list[str], query: str | None,
                                               fragment: str | None) -> None:
    url = f"{scheme}://{host}{port}/" + "/".join(segments)
    if query is not None:
        url += "?" + query
    if fragment is not None:
        url += "#" + fragment
    once = normalize_url(url)
    if once is None:
        return
    assert once.isascii() and "#" not in once and " " not in once
    assert normalize_url(once) == once
