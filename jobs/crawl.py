"""`kiln crawl`: a polite, resumable crawler that archives pages as standard WARC files."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

from dataprep.crawl.addresses import BlockedAddressError, ResolveError, checked_addresses
from dataprep.crawl.config import CrawlConfig
from dataprep.crawl.crawler import Crawler
from dataprep.crawl.urls import parse_seeds
from kiln.cli import entry
from kiln.config import load_config
from kiln.errors import DataError, UsageError
from kiln.log import get_logger

log = get_logger(__name__)

# flag -> config key; a flag given on the command line wins over --config and --set.
_FLAG_KEYS = {
    "max_pages": "scope.max_pages",
    "max_depth": "scope.max_depth",
    "delay": "politeness.delay_s",
    "concurrency": "politeness.concurrency",
    "per_host_concurrency": "politeness.per_host_concurrency",
    "timeout": "fetch.timeout_s",
    "max_bytes": "fetch.max_bytes",
    "user_agent": "fetch.user_agent",
    "max_file_bytes": "output.max_file_bytes",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln crawl",
        description="Crawl from seed URLs into DIR/*.warc.gz, obeying robots.txt. Re-running the "
                    "same command on the same DIR resumes an interrupted crawl.")
    p.add_argument("--seeds", required=True, metavar="FILE",
                   help="seed URLs, one per line; '#' starts a comment")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (WARC files, crawl-journal.jsonl, crawl-report.json)")
    p.add_argument("--max-pages", type=int, metavar="N", help="responses to archive in total")
    p.add_argument("--max-depth", type=int, metavar="D", help="link hops from a seed")
    p.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                   help="also crawl this host (the seeds' hosts always are); repeatable")
    p.add_argument("--allow-private", action="store_true",
                   help="permit private, loopback and link-local addresses (refused by default)")
    p.add_argument("--delay", type=float, metavar="S", help="seconds between requests per origin")
    p.add_argument("--concurrency", type=int, metavar="N", help="fetches in flight in total")
    p.add_argument("--per-host-concurrency", type=int, metavar="N",
                   help="fetches in flight per origin")
    p.add_argument("--timeout", type=float, metavar="S", help="socket timeout per operation")
    p.add_argument("--max-bytes", type=int, metavar="N",
                   help="cut longer bodies (marked WARC-Truncated: length)")
    p.add_argument("--user-agent", metavar="UA", help="User-Agent (its product token is matched "
                                                      "against robots.txt groups)")
    p.add_argument("--max-file-bytes", type=int, metavar="N", help="rotate WARC files past this")
    p.add_argument("--config", metavar="FILE", help="YAML file with crawl settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. politeness.delay_s=2; repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    return p


def load_crawl_config(args: argparse.Namespace) -> CrawlConfig:
    overrides = list(args.set)
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.allow_host:
        overrides.append(f"scope.allow_hosts={json.dumps(args.allow_host)}")  # JSON is YAML
    if args.allow_private:
        overrides.append("scope.allow_private=true")
    return load_config(CrawlConfig, args.config, overrides)


def read_seeds(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--seeds {path}: cannot read: {exc}") from None
    return parse_seeds(text, path)


def refuse_private_seeds(seeds: Sequence[str], allow_private: bool) -> None:
    """Fail fast, before any output is written, when a seed points at a non-public address."""
    for seed in seeds:
        parts = urlsplit(seed)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            checked_addresses(parts.hostname or "", port, allow_private)
        except BlockedAddressError as exc:
            raise UsageError(f"seed {seed}: refusing to crawl: {exc}") from None
        except ResolveError as exc:
            log.warning("seed %s: %s (it will be recorded as a dns error)", seed, exc)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    config = load_crawl_config(args)
    seeds = read_seeds(args.seeds)
    refuse_private_seeds(seeds, config.scope.allow_private)
    report = Crawler(config, seeds, args.out, progress=not args.no_progress).run()
    if report["fetched"] == 0 and report["errors"]:
        errors = ", ".join(f"{k}={v}" for k, v in report["errors"].items())
        raise DataError(f"no page could be fetched ({errors}); see crawl-report.json",
                        path=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(entry(main))
