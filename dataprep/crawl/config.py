"""The crawl's typed config (loaded with `kiln.config.load_config`); defaults are the polite ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from kiln.errors import ConfigError

try:
    _VERSION = version("llmkiln")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "dev"

DEFAULT_USER_AGENT = f"llmkiln/{_VERSION} (llmkiln training-data crawler; robots token: llmkiln)"
DEFAULT_CONTENT_TYPES = ["text/html", "application/xhtml+xml", "text/plain"]


@dataclass
class ScopeConfig:
    """What to crawl: the hosts, how deep, how many pages."""

    max_pages: int = 1000  # responses archived (redirects included), over all runs of this crawl
    max_depth: int = 3  # link hops from a seed; redirects do not add a hop
    allow_hosts: list[str] = field(default_factory=list)  # added to the seeds' hosts
    allow_private: bool = False  # permit private, loopback and link-local addresses


@dataclass
class PolitenessConfig:
    """How hard to push servers: per-origin gap and parallelism, global parallelism."""

    delay_s: float = 1.0  # minimum gap between the end of one request and the next, per origin
    per_host_concurrency: int = 1
    max_crawl_delay_s: float = 30.0  # cap on robots.txt Crawl-delay, so one file cannot stall us
    concurrency: int = 8  # fetches in flight over all origins


@dataclass
class FetchConfig:
    """One HTTP exchange: identity, limits, retries."""

    user_agent: str = DEFAULT_USER_AGENT
    timeout_s: float = 20.0  # per socket operation
    deadline_s: float = 120.0  # whole response, so a trickling server cannot hold a worker
    max_bytes: int = 10 * 1024 * 1024  # longer bodies are cut and marked WARC-Truncated: length
    max_redirects: int = 5
    content_types: list[str] = field(default_factory=lambda: list(DEFAULT_CONTENT_TYPES))
    max_retries: int = 3  # on 429/5xx and connection failures
    backoff_s: float = 1.0  # first retry wait; doubles each retry
    max_backoff_s: float = 60.0


@dataclass
class OutputConfig:
    """The WARC files."""

    prefix: str = "kiln-crawl"
    max_file_bytes: int = 1024**3  # rotate to a new file past this size (1 GB is the usual WARC size)
    warc_version: str = "1.1"


@dataclass
class CrawlConfig:
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    politeness: PolitenessConfig = field(default_factory=PolitenessConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        checks = [
            ("scope.max_pages", self.scope.max_pages >= 0, "must be >= 0"),
            ("scope.max_depth", self.scope.max_depth >= 0, "must be >= 0"),
            ("politeness.delay_s", self.politeness.delay_s >= 0, "must be >= 0"),
            ("politeness.per_host_concurrency", self.politeness.per_host_concurrency >= 1,
             "must be >= 1"),
            ("politeness.concurrency", self.politeness.concurrency >= 1, "must be >= 1"),
            ("fetch.timeout_s", self.fetch.timeout_s > 0, "must be > 0"),
            ("fetch.deadline_s", self.fetch.deadline_s > 0, "must be > 0"),
            ("fetch.max_bytes", self.fetch.max_bytes > 0, "must be > 0"),
            ("fetch.max_redirects", self.fetch.max_redirects >= 0, "must be >= 0"),
            ("fetch.max_retries", self.fetch.max_retries >= 0, "must be >= 0"),
            ("fetch.user_agent", bool(self.fetch.user_agent.strip()), "must not be empty"),
            ("output.max_file_bytes", self.output.max_file_bytes > 0, "must be > 0"),
            ("output.warc_version", self.output.warc_version in ("1.0", "1.1"),
             "must be '1.0' or '1.1'"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(key, message)
