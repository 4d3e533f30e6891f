"""`kiln crawl` end to end over real loopback HTTP: the Node.js docs site and a site of edge cases."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urldefrag, urljoin, urlsplit

import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.checker import Checker

from jobs.crawl import build_parser, load_crawl_config, main
from jobs.serve_site import SAMPLE_SITE, serve_sample_site
from kiln.cli import run_main

REPO = Path(__file__).resolve().parents[2]
DISALLOWED = ("/deprecations.html", "/errors.html")
FAST = ["--allow-private", "--no-progress", "--delay", "0"]


def crawl(seeds: Path, out: Path, *extra: str) -> int:
    return run_main(main, ["--seeds", str(seeds), "--out", str(out), *extra])


def warc_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.warc.gz"))


def read_warcs(out: Path) -> list[SimpleNamespace]:
    """Every record of every WARC file, with warcio's digest verdict."""
    records = []
    for path in warc_files(out):
        with open(path, "rb") as f:
            for record in ArchiveIterator(f, check_digests=True):
                payload = record.content_stream().read()
                records.append(SimpleNamespace(
                    file=path.name, type=record.rec_type, headers=record.rec_headers,
                    http=record.http_headers, payload=payload,
                    uri=record.rec_headers.get_header("WARC-Target-URI"),
                    digest_ok=record.digest_checker.passed))
    return records


def responses(out: Path) -> list[str]:
    return [r.uri for r in read_warcs(out) if r.type == "response"]


def report(out: Path) -> dict:
    return json.loads((out / "crawl-report.json").read_text())


@pytest.fixture(scope="module")
def docs_site() -> Iterator[str]:
    base, stop = serve_sample_site(disallow=DISALLOWED)
    yield base
    stop()


@pytest.fixture(scope="module")
def docs_seeds(docs_site: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seeds") / "seeds.txt"
    path.write_text(f"# the Node.js API docs on loopback\n{docs_site}/index.html\n")
    return path


@pytest.fixture(scope="module")
def full_crawl(docs_seeds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full")
    rc = crawl(docs_seeds, out, *FAST, "--max-depth", "1", "--concurrency", "4",
               "--per-host-concurrency", "2", "--max-file-bytes", "400000")
    assert rc == 0
    return out


def expected_depth1_pages(base: str) -> set[str]:
    """The seed plus its same-host links, found with a regex (independently of the crawler)."""
    with tarfile.open(SAMPLE_SITE) as tar:
        html = tar.extractfile("index.html").read().decode()  # type: ignore[union-attr]
    seed = f"{base}/index.html"
    links = {urldefrag(urljoin(seed, href))[0] for href in re.findall(r'<a [^>]*href="([^"]+)"', html)}
    same_host = {u for u in links if urlsplit(u).netloc == urlsplit(base).netloc}
    return ({seed} | same_host) - {base + p for p in DISALLOWED}


def test_full_crawl_passes_warcio_check_with_verified_digests(full_crawl: Path) -> None:
    files = [str(p) for p in warc_files(full_crawl)]
    assert len(files) > 1  # rotated at --max-file-bytes
    assert Checker(SimpleNamespace(inputs=files, verbose=False)).process_all() == 0
    records = read_warcs(full_crawl)
    assert all(r.digest_ok is True for r in records if r.type in ("response", "request"))
    for name in {r.file for r in records}:
        in_file = [r for r in records if r.file == name]
        assert in_file[0].type == "warcinfo"
        info_id = in_file[0].headers.get_header("WARC-Record-ID")
        assert all(r.headers.get_header("WARC-Warcinfo-ID") == info_id for r in in_file[1:])


def test_full_crawl_archives_each_page_once_with_linked_request(full_crawl: Path,
                                                                docs_site: str) -> None:
    records = read_warcs(full_crawl)
    by_id = {r.headers.get_header("WARC-Record-ID"): r for r in records}
    resp = [r for r in records if r.type == "response"]
    assert len({r.uri for r in resp}) == len(resp)  # no duplicate response records
    assert {r.uri for r in resp} == expected_depth1_pages(docs_site)
    for request in (r for r in records if r.type == "request"):
        target = by_id[request.headers.get_header("WARC-Concurrent-To")]
        assert target.type == "response" and target.uri == request.uri
        assert (request.http.protocol, request.http.statusline) == (
            "GET", f"{urlsplit(request.uri).path} HTTP/1.1")
        assert request.http.get_header("User-Agent").startswith("llmkiln/")
    for r in resp:
        assert r.headers.get_header("WARC-IP-Address") == "127.0.0.1"
        assert r.headers.get_header("WARC-Payload-Digest").startswith("sha1:")
    fs_page = next(r for r in resp if r.uri.endswith("/fs.html"))
    assert fs_page.http.get_statuscode() == "200" and b"<title>File system" in fs_page.payload


def test_full_crawl_obeys_robots_txt_and_reports_counts(full_crawl: Path, docs_site: str) -> None:
    pages = set(responses(full_crawl))
    assert not any(urlsplit(u).path in DISALLOWED for u in pages)
    rep = report(full_crawl)
    assert rep["skipped"] == {"robots": len(DISALLOWED)}
    assert rep["fetched"] == len(pages) and rep["errors"] == {}
    assert rep["depth"] == {"0": 1, "1": len(pages) - 1}
    assert rep["links_dropped"]["too-deep"] > 0 and rep["links_dropped"]["out-of-scope"] > 0
    assert rep["frontier_left"] == 0
    assert rep["warc_files"] == [p.name for p in warc_files(full_crawl)]
    assert rep["this_run"]["robots"] == {docs_site: "HTTP 200"}


def test_page_budget_is_honoured_and_a_rerun_with_more_budget_continues(
        docs_seeds: Path, tmp_path: Path) -> None:
    assert crawl(docs_seeds, tmp_path, *FAST, "--max-pages", "5") == 0
    assert len(responses(tmp_path)) == 5
    assert report(tmp_path)["fetched"] == 5 and report(tmp_path)["frontier_left"] > 0
    assert crawl(docs_seeds, tmp_path, *FAST, "--max-pages", "8") == 0
    pages = responses(tmp_path)
    assert len(pages) == 8 == len(set(pages))


def test_depth_zero_fetches_only_the_seed(docs_seeds: Path, docs_site: str,
                                          tmp_path: Path) -> None:
    assert crawl(docs_seeds, tmp_path, *FAST, "--max-depth", "0") == 0
    assert responses(tmp_path) == [f"{docs_site}/index.html"]
    assert report(tmp_path)["links_dropped"]["too-deep"] > 60


def test_loopback_seed_is_refused_without_allow_private(docs_seeds: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "never"
    assert crawl(docs_seeds, out, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "refusing to crawl" in err and "a loopback address" in err and "--allow-private" in err
    assert not out.exists()


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "cannot read"),
    ("# only comments\n", [], "no seed URLs"),
    ("http://127.0.0.1/\nnot a url\n", [], "line 2: not an absolute http(s) URL"),
    ("http://127.0.0.1/\n", ["--set", "scope.max_pagez=3"], "config key 'scope.max_pagez'"),
    ("http://127.0.0.1/\n", ["--delay", "-1"], "config key 'politeness.delay_s'"),
])
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   content: str | None, extra: list[str],
                                                   message: str) -> None:
    seeds = tmp_path / "seeds.txt"
    if content is not None:
        seeds.write_text(content)
    assert crawl(seeds, tmp_path / "out", "--allow-private", *extra) == 2
    assert message in capsys.readouterr().err


# --- a site of edge cases: retries, redirects, content types, sizes, robots, politeness ---------

EDGE_LINKS = ["/big.html", "/data.json", "/img.png", "/notes.txt", "/flaky.html", "/old",
              "/r1", "/gone.html", "/private/secret.html", "http://elsewhere.invalid/x"]


class _EdgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: Counter[str]
    arrivals: list[float]
    robots: bytes | None = b"User-agent: *\nDisallow: /private\n"
    active = 0
    max_active = 0
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802
        cls = type(self)
        with cls.lock:
            cls.arrivals.append(time.monotonic())
            cls.hits[self.path] += 1
            cls.active += 1
            cls.max_active = max(cls.max_active, cls.active)
        try:
            self._route(self.path)
        finally:
            with cls.lock:
                cls.active -= 1

    def _route(self, path: str) -> None:
        html = "text/html; charset=utf-8"
        if path == "/robots.txt":
            if self.robots is None:  # a server that cannot say what it allows
                self._send(503, b"down", "text/plain")
            else:
                self._send(200, self.robots, "text/plain")
        elif path == "/":
            body = "".join(f'<a href="{u}">{u}</a>' for u in EDGE_LINKS).encode()
            self._send(200, b"<html><body>" + body + b"</body></html>", html)
        elif path == "/big.html":
            self._send(200, b"<html>" + b"y" * 300_000 + b"</html>", html)
        elif path == "/data.json":
            self._send(200, b"{}", "application/json")
        elif path == "/img.png":
            self._send(200, b"\x89PNG....", "image/png")
        elif path == "/notes.txt":
            self._send(200, b"plain notes", "text/plain")
        elif path == "/flaky.html" and self.hits[path] <= 2:
            self._send(503, b"try later", "text/plain")
        elif path == "/old":
            self._send(301, b"", html, [("Location", "/new.html")])
        elif path in ("/r1", "/r2", "/r3"):
            self._send(302, b"", html, [("Location", f"/r{int(path[2]) + 1}")])
        elif path == "/gone.html":
            self._send(500, b"<html>broken</html>", html)
        else:
            self._send(200, f"<html>{path}</html>".encode(), html)

    def _send(self, status: int, body: bytes, ctype: str,
              extra: list[tuple[str, str]] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _serve(handler: type[_EdgeHandler]) -> tuple[str, ThreadingHTTPServer, threading.Thread]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd, thread


@pytest.fixture
def edge_site(request: pytest.FixtureRequest) -> Iterator[tuple[str, type[_EdgeHandler]]]:
    robots = getattr(request, "param", _EdgeHandler.robots)
    handler = type("Edge", (_EdgeHandler,), {"hits": Counter(), "arrivals": [], "robots": robots})
    base, httpd, thread = _serve(handler)
    yield base, handler
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_edge_cases_retries_redirects_types_sizes(edge_site, tmp_path: Path) -> None:
    base, handler = edge_site
    seeds = tmp_path / "seeds.txt"
    seeds.write_text(f"{base}/\n")
    out = tmp_path / "out"
    assert crawl(seeds, out, *FAST, "--max-bytes", "100000", "--set", "fetch.backoff_s=0.01",
                 "--set", "fetch.max_redirects=2") == 0
    records = {r.uri: r for r in read_warcs(out) if r.type == "response"}
    status = {urlsplit(u).path: int(r.http.get_statuscode()) for u, r in records.items()}
    assert status == {"/": 200, "/big.html": 200, "/notes.txt": 200, "/flaky.html": 200,
                      "/old": 301, "/new.html": 200, "/r1": 302, "/r2": 302, "/r3": 302,
                      "/gone.html": 500}
    big = records[f"{base}/big.html"]
    assert big.headers.get_header("WARC-Truncated") == "length" and len(big.payload) == 100_000
    assert handler.hits["/flaky.html"] == 3  # two 503s, then the archived 200
    assert handler.hits["/gone.html"] == 4  # first try plus fetch.max_retries=3
    assert "/private/secret.html" not in handler.hits and "/r4" not in handler.hits
    rep = report(out)
    assert rep["skipped"] == {"content-type": 2, "robots": 1}
    assert rep["errors"] == {"http-500": 1}
    assert rep["truncated"] == 1
    assert rep["links_dropped"] == {"out-of-scope": 1, "too-many-redirects": 1}
    assert Checker(SimpleNamespace(inputs=[str(p) for p in warc_files(out)],
                                   verbose=False)).process_all() == 0


@pytest.mark.parametrize("edge_site", [b"User-agent: *\nCrawl-delay: 0.25\n"], indirect=True)
def test_crawl_delay_and_per_host_concurrency_are_respected(edge_site, tmp_path: Path) -> None:
    base, handler = edge_site
    seeds = tmp_path / "seeds.txt"
    seeds.write_text(f"{base}/\n")
    assert crawl(seeds, tmp_path / "out", *FAST, "--max-pages", "4", "--concurrency", "4",
                 "--set", "fetch.backoff_s=0.01") == 0
    gaps = [b - a for a, b in zip(handler.arrivals, handler.arrivals[1:], strict=False)]
    assert len(handler.arrivals) >= 5  # robots.txt, 4 pages, content-type skips and retries
    # A lower bound on request spacing (never an upper bound: a slow machine only adds time).
    assert min(gaps) >= 0.25 * 0.95
    assert handler.max_active == 1


@pytest.mark.parametrize("edge_site", [None], indirect=True)
def test_unreadable_robots_txt_means_nothing_is_fetched(edge_site, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    base, handler = edge_site
    seeds = tmp_path / "seeds.txt"
    seeds.write_text(f"{base}/\n")
    out = tmp_path / "out"
    assert crawl(seeds, out, *FAST, "--set", "fetch.backoff_s=0.01") == 1
    assert "no page could be fetched (robots-unavailable=1)" in capsys.readouterr().err
    assert dict(handler.hits) == {"/robots.txt": 4}  # RFC 9309: 5xx means disallow all
    assert report(out)["this_run"]["robots"] == {base: "HTTP 503"}


def test_flags_override_set_which_overrides_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "crawl.yaml"
    config.write_text("scope: {max_pages: 7, max_depth: 2}\npoliteness: {delay_s: 3.0}\n")
    args = build_parser().parse_args([
        "--seeds", "s", "--out", "o", "--config", str(config), "--set", "scope.max_pages=9",
        "--set", "politeness.delay_s=4", "--delay", "0.5", "--allow-host", "a.example",
        "--allow-host", "b.example"])
    loaded = load_crawl_config(args)
    assert (loaded.scope.max_pages, loaded.scope.max_depth) == (9, 2)
    assert loaded.politeness.delay_s == 0.5
    assert loaded.scope.allow_hosts == ["a.example", "b.example"]
    assert loaded.scope.allow_private is False


# --- resumability: SIGKILL half-way, restart with the same command --------------------------


def test_restart_recovers_a_page_archived_but_not_journaled_and_cuts_a_torn_tail(
        docs_seeds: Path, tmp_path: Path) -> None:
    assert crawl(docs_seeds, tmp_path, *FAST, "--max-pages", "3") == 0
    journal = tmp_path / "crawl-journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    last_done = max(i for i, line in enumerate(lines) if '"outcome":"fetched"' in line)
    lost = json.loads(lines[last_done])
    # The crash window: the WARC transaction is on disk, its journal line is not; and a second
    # transaction was cut mid-member.
    journal.write_text("".join(lines[:last_done]))
    with open(tmp_path / lost["warc"], "ab") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xffhalf a record")
    frontier_before = report(tmp_path)["frontier_left"]

    assert crawl(docs_seeds, tmp_path, *FAST, "--max-pages", "3") == 0

    rep = report(tmp_path)
    assert rep["this_run"] == {"recovered": 1, "robots": {}}  # nothing fetched again
    assert rep["fetched"] == 3 and rep["frontier_left"] == frontier_before  # outlinks re-queued
    pages = responses(tmp_path)
    assert len(pages) == len(set(pages)) == 3 and lost["url"] in pages
    recovered = json.loads(journal.read_text().splitlines()[-1])
    assert (recovered["url"], recovered["end"]) == (lost["url"], lost["end"])
    assert (tmp_path / lost["warc"]).stat().st_size == lost["end"]
    assert Checker(SimpleNamespace(inputs=[str(p) for p in warc_files(tmp_path)],
                                   verbose=False)).process_all() == 0


def test_sigkill_and_restart_ends_with_the_same_pages_and_no_duplicates(
        full_crawl: Path, docs_seeds: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jobs.crawl", "--seeds", str(docs_seeds), "--out", str(out),
           "--allow-private", "--no-progress", "--max-depth", "1", "--delay", "0.03",
           "--max-file-bytes", "400000"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = out / "crawl-journal.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b'"outcome":"fetched"') >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the crawl finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = journal.read_bytes().count(b'"outcome":"fetched"')
    assert done_before < len(responses(full_crawl))

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr

    pages = responses(out)
    assert sorted(pages) == sorted(responses(full_crawl))  # same pages, each exactly once
    fetched = [json.loads(line)["url"] for line in journal.read_text().splitlines()
               if '"outcome":"fetched"' in line]
    assert len(fetched) == len(set(fetched)) == len(pages)  # nothing fetched twice
    assert report(out)["this_run"].get("fetched", 0) <= len(pages) - done_before
    assert Checker(SimpleNamespace(inputs=[str(p) for p in warc_files(out)],
                                   verbose=False)).process_all() == 0
