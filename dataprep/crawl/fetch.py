"""One HTTP GET over a socket pinned to a checked address, recorded byte-exactly for WARC.

Redirects are not followed here: the crawler queues each Location like any other URL, so every hop
passes the same scope, robots, politeness and address checks.
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from dataprep.crawl.addresses import (
    BlockedAddressError,
    IPAddress,
    ResolveError,
    checked_addresses,
)
from dataprep.crawl.links import media_type
from dataprep.crawl.policy import RetryPolicy, parse_retry_after
from dataprep.crawl.robots import ROBOTS_MAX_BYTES, RobotsRules, rules_for_response
from dataprep.crawl.urls import normalize_url, path_and_query

_READ_CHUNK = 64 * 1024


@dataclass
class Exchange:
    """One request and its response, as sent and (after de-chunking) as received."""

    url: str
    ip: str
    request: bytes
    status: int
    reason: str
    protocol: str
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool
    date: datetime  # when the request was sent: the WARC-Date of both records

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass
class FetchResult:
    """What one URL's fetch came to: an exchange to archive, a skip, or an error kind."""

    url: str
    exchange: Exchange | None = None
    outcome: str = "fetched"  # fetched | skipped | error
    reason: str = ""  # skip reason (content-type) or error kind (dns, timeout, http-5xx, ...)
    detail: str = ""
    attempts: int = 1
    waits: list[float] = field(default_factory=list)  # back-off sleeps between attempts


class FetchError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class FetchLimits:
    user_agent: str
    timeout_s: float = 20.0
    deadline_s: float = 120.0
    max_bytes: int = 10 * 1024 * 1024
    content_types: Sequence[str] | None = None  # for 2xx responses; None accepts every type
    allow_private: bool = False


def build_request(url: str, user_agent: str, accept: str = "*/*") -> bytes:
    """The exact request bytes sent (and archived). `Connection: close`: with a politeness gap of
    a second or more between requests to one origin, a kept-alive socket would only idle."""
    parts = urlsplit(url)
    lines = [
        f"GET {path_and_query(url)} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"User-Agent: {user_agent}",
        f"Accept: {accept}",
        "Accept-Encoding: identity",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def fetch_once(url: str, limits: FetchLimits) -> Exchange | None:
    """GET `url` once. None when the content type is not wanted (the body is then never read).

    Raises FetchError with a kind: dns, blocked-address, connect, timeout, tls, connection,
    bad-response.
    """
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    try:
        addresses = checked_addresses(parts.hostname or "", port, limits.allow_private)
    except ResolveError as exc:
        raise FetchError("dns", str(exc)) from None
    except BlockedAddressError as exc:
        raise FetchError("blocked-address", str(exc)) from None
    accept = ",".join(limits.content_types) + ";q=1.0,*/*;q=0.1" if limits.content_types else "*/*"
    request = build_request(url, limits.user_agent, accept)
    deadline = time.monotonic() + limits.deadline_s
    sock, ip = _connect(addresses, port, limits.timeout_s, parts.hostname if tls else None)
    date = datetime.now(UTC)
    try:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock, method="GET")
        response.begin()
        headers = list(response.msg.items())
        if limits.content_types is not None and 200 <= response.status < 300:
            kind = media_type(response.getheader("Content-Type") or "")
            if kind not in limits.content_types:
                response.close()
                raise _Unwanted(kind or "(none)")
        body, truncated = _read_body(response, limits.max_bytes, deadline)
        if response.chunked:
            headers = _unchunked_headers(headers, len(body))
        protocol = "HTTP/1.0" if response.version == 10 else "HTTP/1.1"
        return Exchange(url, str(ip), request, response.status, response.reason, protocol,
                        headers, body, truncated, date)
    except _Unwanted:
        return None
    except TimeoutError as exc:
        raise FetchError("timeout", f"{url}: timed out ({exc})") from None
    except (ConnectionError, http.client.IncompleteRead) as exc:
        raise FetchError("connection", f"{url}: {exc!r}") from None
    except (http.client.HTTPException, ValueError) as exc:
        raise FetchError("bad-response", f"{url}: {exc!r}") from None
    except OSError as exc:
        raise FetchError("connection", f"{url}: {exc}") from None
    finally:
        sock.close()


def fetch_with_retries(url: str, limits: FetchLimits, policy: RetryPolicy,
                       sleep: Callable[[float], None] = time.sleep,
                       min_wait: float = 0.0) -> FetchResult:
    """`fetch_once` with bounded exponential back-off on 429/5xx and connection failures.

    A retry never comes sooner than `min_wait` (the origin's politeness gap): it is a request too.
    """
    waits: list[float] = []
    attempt = 0
    while True:
        try:
            exchange = fetch_once(url, limits)
        except FetchError as exc:
            if policy.should_retry(attempt, error=exc.kind):
                waits.append(max(min_wait, policy.delay(attempt)))
                sleep(waits[-1])
                attempt += 1
                continue
            return FetchResult(url, None, "error", exc.kind, str(exc), attempt + 1, waits)
        if exchange is None:
            return FetchResult(url, None, "skipped", "content-type", "", attempt + 1, waits)
        if policy.should_retry(attempt, status=exchange.status):
            retry_after = parse_retry_after(exchange.header("Retry-After"))
            waits.append(max(min_wait, policy.delay(attempt, retry_after)))
            sleep(waits[-1])
            attempt += 1
            continue
        return FetchResult(url, exchange, "fetched", "", "", attempt + 1, waits)


def fetch_robots(origin_url: str, limits: FetchLimits, policy: RetryPolicy,
                 max_redirects: int = 5, sleep: Callable[[float], None] = time.sleep,
                 min_wait: float = 0.0) -> tuple[RobotsRules, str]:
    """The robots.txt rules of an origin and a note on how they were obtained.

    Redirects are followed (RFC 9309 asks for at least five), each hop address-checked.
    """
    url = f"{origin_url}/robots.txt"
    robots_limits = FetchLimits(limits.user_agent, limits.timeout_s, limits.deadline_s,
                                ROBOTS_MAX_BYTES, None, limits.allow_private)
    for _hop in range(max_redirects + 1):
        result = fetch_with_retries(url, robots_limits, policy, sleep, min_wait)
        exchange = result.exchange
        if exchange is None:
            return rules_for_response(None, b""), f"{result.reason}: {result.detail}"
        location = exchange.header("Location")
        if 300 <= exchange.status < 400 and location:
            target = normalize_url(location, url)
            if target is None:
                break
            url = target
            continue
        return rules_for_response(exchange.status, exchange.body), f"HTTP {exchange.status}"
    return rules_for_response(None, b""), "redirect loop or bad Location"


class _Unwanted(Exception):
    pass


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # One context for the process: building one loads the CA store, and wrap_socket is thread-safe.
    return ssl.create_default_context()


def _connect(addresses: list[IPAddress], port: int, timeout: float,
             tls_hostname: str | None) -> tuple[socket.socket, IPAddress]:
    """Connect to the first reachable checked address (never to a name, which could re-resolve)."""
    errors: list[str] = []
    timeouts = 0
    for ip in addresses:
        try:
            sock = socket.create_connection((str(ip), port), timeout=timeout)
        except TimeoutError as exc:
            errors.append(f"{ip}: timed out ({exc})")
            timeouts += 1
            continue
        except OSError as exc:
            errors.append(f"{ip}: {exc}")
            continue
        if tls_hostname is None:
            return sock, ip
        try:
            return _tls_context().wrap_socket(sock, server_hostname=tls_hostname), ip
        except ssl.SSLError as exc:
            sock.close()
            raise FetchError("tls", f"{tls_hostname} ({ip}): {exc}") from None
        except OSError as exc:
            sock.close()
            errors.append(f"{ip}: {exc}")
    raise FetchError("timeout" if timeouts == len(addresses) else "connect",
                     "cannot connect: " + "; ".join(errors))


def _read_body(response: http.client.HTTPResponse, max_bytes: int,
               deadline: float) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            raise TimeoutError("response deadline passed")
        chunk = response.read(min(_READ_CHUNK, max_bytes + 1 - size))
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:max_bytes], True


def _unchunked_headers(headers: list[tuple[str, str]], length: int) -> list[tuple[str, str]]:
    # The archived body is de-chunked, so the headers must not claim chunking. Common Crawl's
    # convention: keep the original under an X-Crawler- prefix and state the stored length.
    out = []
    for name, value in headers:
        if name.lower() in ("transfer-encoding", "content-length"):
            out.append((f"X-Crawler-{name}", value))
        else:
            out.append((name, value))
    out.append(("Content-Length", str(length)))
    return out
