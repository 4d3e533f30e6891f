"""robots.txt per RFC 9309, checked against the RFC's own rules and against urllib.robotparser
where the two specifications agree."""

from __future__ import annotations

import urllib.robotparser

import pytest

from dataprep.crawl.robots import parse_robots, robots_token, rules_for_response

RFC_EXAMPLE = """
User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot
"""


@pytest.mark.parametrize("agent, path, allowed", [
    ("foobot", "/example/page.html", True),
    ("foobot", "/example/allowed.gif", True),
    ("foobot", "/other", False),
    ("barbot", "/example/page.html", False),
    ("bazbot", "/example/page.html", False),
    ("bazbot", "/example/other.html", True),
    ("quxbot", "/anything", True),  # an empty group allows everything
    ("otherbot", "/example/x", False),  # falls back to *
    ("otherbot", "/pic.gif", False),
    ("otherbot", "/pic.gif?x=1", True),  # $ anchors at the end of path+query
    ("otherbot", "/publications/x", True),
    ("FooBot", "/other", False),  # product tokens match case-insensitively
])
def test_rfc9309_example_groups(agent: str, path: str, allowed: bool) -> None:
    assert parse_robots(RFC_EXAMPLE).allows(agent, path) is allowed


def test_longest_match_wins_and_allow_wins_ties() -> None:
    rules = parse_robots("User-agent: *\nAllow: /p\nDisallow: /\n"
                         "Disallow: /folder/\nAllow: /folder/page\nAllow: /same\nDisallow: /same\n")
    assert rules.allows("bot", "/page")
    assert not rules.allows("bot", "/x")
    assert rules.allows("bot", "/folder/page.html")
    assert not rules.allows("bot", "/folder/other")
    assert rules.allows("bot", "/same")


def test_wildcards_and_percent_encoding() -> None:
    rules = parse_robots("User-agent: *\nDisallow: /*/private/*.html$\nDisallow: /caf\u00e9\n"
                         "Disallow: /a%3cb\n")
    assert not rules.allows("bot", "/x/y/private/z.html")
    assert rules.allows("bot", "/x/y/private/z.htmlx")
    assert not rules.allows("bot", "/caf%C3%A9/menu")  # non-ASCII in the file matches encoded URL
    assert not rules.allows("bot", "/a%3Cb")  # escapes compare case-insensitively


def test_groups_for_one_agent_are_combined_and_robots_txt_always_allowed() -> None:
    rules = parse_robots("User-agent: kiln\nDisallow: /a\n\nUser-agent: *\nDisallow: /\n\n"
                         "User-agent: kiln\nDisallow: /b\nCrawl-delay: 2.5\n")
    assert not rules.allows("kiln", "/a") and not rules.allows("kiln", "/b")
    assert rules.allows("kiln", "/c")  # the * group does not apply to a named agent
    assert rules.allows("other", "/robots.txt")
    assert rules.crawl_delay("kiln") == 2.5
    assert rules.crawl_delay("other") is None


def test_rules_before_any_user_agent_and_junk_lines_are_ignored() -> None:
    rules = parse_robots("Disallow: /\n<html>oops</html>\nUser-agent: *\nDisallow: /x # note\n"
                         "Crawl-delay: soon\n")
    assert rules.allows("bot", "/y") and not rules.allows("bot", "/x")
    assert rules.crawl_delay("bot") is None


@pytest.mark.parametrize("status, body, path, allowed, source", [
    (200, b"User-agent: *\nDisallow: /x\n", "/x", False, "parsed"),
    (404, b"", "/x", True, "missing"),
    (403, b"", "/x", True, "missing"),  # RFC 9309: any 4xx means no restrictions
    (503, b"", "/x", False, "unreachable"),  # 5xx: assume complete disallow
    (None, b"", "/x", False, "unreachable"),
])
def test_rules_for_response_status(status: int | None, body: bytes, path: str, allowed: bool,
                                   source: str) -> None:
    rules = rules_for_response(status, body)
    assert rules.allows("bot", path) is allowed
    assert rules.source == source


def test_robots_token_is_the_product_name() -> None:
    assert robots_token("llmkiln/0.1.0 (crawler; +https://x)") == "llmkiln"
    assert robots_token("Kiln") == "kiln"


SIMPLE_FILES = [
    "User-agent: *\nDisallow: /private/\nDisallow: /tmp\n",
    "User-agent: llmkiln\nDisallow: /\n\nUser-agent: *\nDisallow: /cgi-bin/\n",
    "User-agent: otherbot\nDisallow: /\n",
    "User-agent: *\nDisallow:\n",
]
PATHS = ["/", "/private/", "/private/a.html", "/tmp", "/tmpfile", "/cgi-bin/x", "/public?q=1"]


@pytest.mark.parametrize("text", SIMPLE_FILES)
def test_agrees_with_urllib_robotparser_without_wildcards_or_overlaps(text: str) -> None:
    reference = urllib.robotparser.RobotFileParser()
    reference.parse(text.splitlines())
    rules = parse_robots(text)
    for path in PATHS:
        assert rules.allows("llmkiln", path) == reference.can_fetch("llmkiln/0.1", path), path
