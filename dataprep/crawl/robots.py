"""robots.txt as RFC 9309 defines it: groups, longest-match allow/disallow with `*` and `$`.

`urllib.robotparser` is not used because it applies the first matching rule instead of the
longest, ignores `*`/`$` wildcards, and treats 401/403 as "disallow all" where RFC 9309 says a
4xx robots.txt means no restrictions.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from dataprep.crawl.urls import normalize_escapes

ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 2.5: parse at least 500 KiB


@dataclass(frozen=True)
class RobotsRule:
    allow: bool
    pattern: str

    def matches(self, path: str) -> bool:
        return _compile(self.pattern).match(path) is not None


@dataclass
class RobotsGroup:
    agents: list[str] = field(default_factory=list)
    rules: list[RobotsRule] = field(default_factory=list)
    crawl_delay: float | None = None


@dataclass
class RobotsRules:
    """The parsed robots.txt of one origin, or a blanket decision when it could not be read."""

    groups: list[RobotsGroup] = field(default_factory=list)
    disallow_all: bool = False
    source: str = "parsed"  # parsed | missing (4xx) | unreachable (5xx, network)

    def allows(self, token: str, path: str) -> bool:
        """Whether the crawler named `token` may fetch `path` (path plus query)."""
        if path == "/robots.txt":
            return True
        if self.disallow_all:
            return False
        path = normalize_escapes(path)
        best: RobotsRule | None = None
        for rule in self._rules_for(token):
            if rule.matches(path) and (best is None or _beats(rule, best)):
                best = rule
        return best is None or best.allow

    def crawl_delay(self, token: str) -> float | None:
        delays = [g.crawl_delay for g in self._groups_for(token) if g.crawl_delay is not None]
        return max(delays) if delays else None

    def _groups_for(self, token: str) -> list[RobotsGroup]:
        token = token.lower()
        named = [g for g in self.groups if token in g.agents]
        return named or [g for g in self.groups if "*" in g.agents]

    def _rules_for(self, token: str) -> list[RobotsRule]:
        return [rule for group in self._groups_for(token) for rule in group.rules]


def parse_robots(text: str) -> RobotsRules:
    """Parse robots.txt text. Unknown lines are ignored, as RFC 9309 requires."""
    groups: list[RobotsGroup] = []
    current: RobotsGroup | None = None
    in_agent_lines = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "user-agent":
            if current is None or not in_agent_lines:
                current = RobotsGroup()
                groups.append(current)
            current.agents.append(value.lower())
            in_agent_lines = True
            continue
        in_agent_lines = False
        if current is None:
            continue
        if key in ("allow", "disallow") and value:
            current.rules.append(RobotsRule(key == "allow", normalize_escapes(value)))
        elif key == "crawl-delay":
            try:
                delay = float(value)
            except ValueError:
                continue
            if delay >= 0:
                current.crawl_delay = delay
    return RobotsRules(groups)


def rules_for_response(status: int | None, body: bytes) -> RobotsRules:
    """RFC 9309 2.3.1: 2xx -> parse; 4xx -> no restrictions; 5xx or unreachable -> disallow all."""
    if status is not None and 200 <= status < 300:
        return parse_robots(body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace"))
    if status is not None and 400 <= status < 500:
        return RobotsRules(source="missing")
    return RobotsRules(disallow_all=True, source="unreachable")


def robots_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against: `llmkiln/0.1 (+..)` -> `llmkiln`."""
    return user_agent.split("/", 1)[0].split()[0].lower()


def _beats(rule: RobotsRule, best: RobotsRule) -> bool:
    # RFC 9309 2.2.2: the most specific (longest) match wins; on a tie, allow wins.
    if len(rule.pattern) != len(best.pattern):
        return len(rule.pattern) > len(best.pattern)
    return rule.allow and not best.allow


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + (r"\Z" if anchored else ""), re.DOTALL)
