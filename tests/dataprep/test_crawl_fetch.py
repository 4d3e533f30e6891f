"""Fetching over real loopback HTTP: retries, chunking, truncation, content types, refusals."""

from __future__ import annotations

import io
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from warcio.archiveiterator import ArchiveIterator

from dataprep.crawl.config import DEFAULT_CONTENT_TYPES, DEFAULT_USER_AGENT
from dataprep.crawl.fetch import FetchLimits, build_request, fetch_robots, fetch_with_retries
from dataprep.crawl.policy import RetryPolicy
from dataprep.crawl.warc import PageRecord, WarcFileWriter

PAGE = b"<html><body><a href='/next'>next</a></body></html>"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: Counter[str]
    agents: list[str]

    def do_GET(self) -> None:  # noqa: N802
        self.hits[self.path] += 1
        self.agents.append(self.headers.get("User-Agent", ""))
        if self.path == "/flaky" and self.hits[self.path] <= 2:
            self._send(503, b"busy", "text/plain", [("Retry-After", "0")])
        elif self.path == "/always-500":
            self._send(500, b"broken", "text/html")
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"<html>", b"<body>chunked", b"</body></html>"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/big":
            self._send(200, b"x" * 50_000, "text/html")
        elif self.path == "/data.json":
            self._send(200, b'{"a": 1}', "application/json")
        elif self.path == "/slow":
            time.sleep(1.0)
            try:
                self._send(200, PAGE, "text/html")
            except BrokenPipeError:  # the client gave up first, as the test intends
                pass
        elif self.path == "/drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif self.path == "/robots.txt":
            self._send(301, b"", "text/plain", [("Location", "/real-robots.txt")])
        elif self.path == "/real-robots.txt":
            self._send(200, b"User-agent: llmkiln\nDisallow: /no\nCrawl-delay: 3\n", "text/plain")
        else:
            self._send(200, PAGE, "text/html; charset=utf-8")

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


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {"hits": Counter(), "agents": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _limits(**kw: object) -> FetchLimits:
    options = {"user_agent": DEFAULT_USER_AGENT, "timeout_s": 5.0, "max_bytes": 1 << 20,
               "content_types": tuple(DEFAULT_CONTENT_TYPES), "allow_private": True, **kw}
    return FetchLimits(**options)  # type: ignore[arg-type]


def _archive(tmp_path, result) -> list:
    writer = WarcFileWriter(str(tmp_path), "t", 1 << 30, DEFAULT_USER_AGENT)
    ex = result.exchange
    writer.write_page(PageRecord(ex.url, 0, status=ex.status, size=len(ex.body)), ex, 1)
    writer.close()
    path = next(tmp_path.glob("*.warc.gz"))
    records = []
    with open(path, "rb") as f:
        for record in ArchiveIterator(f, check_digests=True):
            records.append((record.rec_type, record.rec_headers, record.content_stream().read()))
            assert record.digest_checker.passed is not False, record.digest_checker.problems
    return records


def test_503_is_retried_with_exponential_backoff_then_succeeds(server) -> None:
    base, handler = server
    slept: list[float] = []
    policy = RetryPolicy(max_retries=3, backoff_s=0.01, max_backoff_s=1.0)
    result = fetch_with_retries(f"{base}/flaky", _limits(), policy, sleep=slept.append)
    assert result.outcome == "fetched" and result.exchange.status == 200
    assert result.attempts == 3 and handler.hits["/flaky"] == 3
    assert slept == result.waits == [0.01, 0.02]


def test_persistent_500_gives_up_after_the_retry_budget_and_keeps_the_response(server) -> None:
    base, handler = server
    result = fetch_with_retries(f"{base}/always-500", _limits(),
                                RetryPolicy(2, 0.0, 0.0), sleep=lambda s: None)
    assert result.exchange.status == 500 and result.attempts == 3
    assert handler.hits["/always-500"] == 3


def test_request_is_recorded_byte_exactly_and_names_llmkiln(server, tmp_path) -> None:
    base, handler = server
    result = fetch_with_retries(f"{base}/page", _limits(), RetryPolicy(0))
    assert handler.agents == [DEFAULT_USER_AGENT] and "llmkiln" in DEFAULT_USER_AGENT
    ex = result.exchange
    assert ex.request == build_request(ex.url, DEFAULT_USER_AGENT, ex.request.split(b"Accept: ")[1]
                                       .split(b"\r\n")[0].decode())
    records = _archive(tmp_path, result)
    assert [r[0] for r in records] == ["warcinfo", "response", "request", "metadata"]
    response, request = records[1][1], records[2][1]
    assert request.get_header("WARC-Concurrent-To") == response.get_header("WARC-Record-ID")
    assert response.get_header("WARC-IP-Address") == "127.0.0.1"
    assert response.get_header("WARC-Payload-Digest").startswith("sha1:")
    assert records[1][2] == PAGE


def test_chunked_body_is_stored_dechunked_with_headers_saying_so(server, tmp_path) -> None:
    base, _ = server
    result = fetch_with_retries(f"{base}/chunked", _limits(), RetryPolicy(0))
    ex = result.exchange
    assert ex.body == b"<html><body>chunked</body></html>"
    assert ex.header("X-Crawler-Transfer-Encoding") == "chunked"
    assert ex.header("Transfer-Encoding") is None
    assert ex.header("Content-Length") == str(len(ex.body))
    assert _archive(tmp_path, result)[1][2] == ex.body


def test_long_body_is_truncated_and_marked(server, tmp_path) -> None:
    base, _ = server
    result = fetch_with_retries(f"{base}/big", _limits(max_bytes=1000), RetryPolicy(0))
    assert result.exchange.truncated and len(result.exchange.body) == 1000
    response = _archive(tmp_path, result)[1]
    assert response[1].get_header("WARC-Truncated") == "length"
    assert response[2] == b"x" * 1000


def test_unwanted_content_type_is_skipped_without_reading_the_body(server) -> None:
    base, _ = server
    result = fetch_with_retries(f"{base}/data.json", _limits(), RetryPolicy(0))
    assert (result.outcome, result.reason, result.exchange) == ("skipped", "content-type", None)
    anything = fetch_with_retries(f"{base}/data.json", _limits(content_types=None), RetryPolicy(0))
    assert anything.exchange.body == b'{"a": 1}'


def test_loopback_is_refused_without_allow_private_and_never_contacted(server) -> None:
    base, handler = server
    result = fetch_with_retries(f"{base}/page", _limits(allow_private=False), RetryPolicy(3))
    assert (result.outcome, result.reason, result.attempts) == ("error", "blocked-address", 1)
    assert "127.0.0.1, a loopback address" in result.detail
    assert not handler.hits


def test_connection_failures_are_classified_and_retried(server) -> None:
    base, _ = server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = fetch_with_retries(f"http://127.0.0.1:{closed_port}/", _limits(),
                                 RetryPolicy(2, 0.0), sleep=lambda s: None)
    assert (refused.reason, refused.attempts) == ("connect", 3)
    dropped = fetch_with_retries(f"{base}/drop", _limits(), RetryPolicy(1, 0.0),
                                 sleep=lambda s: None)
    assert (dropped.reason, dropped.attempts) == ("connection", 2)
    slow = fetch_with_retries(f"{base}/slow", _limits(timeout_s=0.2), RetryPolicy(0))
    assert slow.reason == "timeout"


def test_robots_txt_follows_redirects(server) -> None:
    base, _ = server
    rules, note = fetch_robots(base, _limits(), RetryPolicy(0))
    assert note == "HTTP 200"
    assert not rules.allows("llmkiln", "/no") and rules.allows("llmkiln", "/yes")
    assert rules.crawl_delay("llmkiln") == 3.0


def test_archived_headers_parse_back_with_warcio(server, tmp_path) -> None:
    base, _ = server
    result = fetch_with_retries(f"{base}/page", _limits(), RetryPolicy(0))
    _archive(tmp_path, result)
    with open(next(tmp_path.glob("*.warc.gz")), "rb") as f:
        data = f.read()
    responses = [r for r in ArchiveIterator(io.BytesIO(data)) if r.rec_type == "response"]
    assert responses[0].http_headers.get_statuscode() == "200"
    assert responses[0].http_headers.get_header("Content-Type") == "text/html; charset=utf-8"


def test_https_with_an_untrusted_certificate_is_a_tls_error(tmp_path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    handler = type("H", (_Handler,), {"hits": Counter(), "agents": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        result = fetch_with_retries(f"https://127.0.0.1:{httpd.server_address[1]}/",
                                    _limits(), RetryPolicy(3))
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert (result.outcome, result.reason, result.attempts) == ("error", "tls", 1)
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert not handler.hits
