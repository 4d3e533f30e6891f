"""A real website on loopback: serves a directory (by default the embedded Node.js API docs) with a
robots.txt, for the crawler's tests, `kiln demo`, and people trying `kiln crawl` offline."""

from __future__ import annotations

import argparse
import functools
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kiln.cli import entry
from kiln.log import get_logger

log = get_logger(__name__)

SAMPLE_SITE = Path(__file__).parent / "sample_data" / "nodejs-api-html.tar.gz"
DEFAULT_DISALLOW = ("/deprecations.html",)


def robots_txt(disallow: Sequence[str] = DEFAULT_DISALLOW, crawl_delay: float | None = None) -> str:
    """A robots.txt applying to every crawler: the given Disallow paths and optional Crawl-delay."""
    lines = ["User-agent: *"]
    lines += [f"Disallow: {path}" for path in disallow] or ["Disallow:"]
    if crawl_delay is not None:
        lines.append(f"Crawl-delay: {crawl_delay:g}")
    return "\n".join(lines) + "\n"


class _SiteHandler(SimpleHTTPRequestHandler):
    """Static files, plus /robots.txt from memory; HTTP/1.1 so clients see Content-Length framing."""

    protocol_version = "HTTP/1.1"
    robots: str = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] == "/robots.txt" and self.robots:
            body = self.robots.encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


def serve_directory(path: str | Path, *, disallow: Sequence[str] = DEFAULT_DISALLOW,
                    crawl_delay: float | None = None, robots: str | None = None,
                    host: str = "127.0.0.1", port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve `path` on `host:port` (port 0: a free one) in a background thread.

    robots.txt disallows `disallow` (or is exactly `robots` when given; "" serves none, so the
    crawler sees a 404). Returns the base URL (`http://127.0.0.1:PORT`) and a `stop()` function.
    """
    text = robots if robots is not None else robots_txt(disallow, crawl_delay)
    handler = type("SiteHandler", (_SiteHandler,), {"robots": text})
    server = ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(path)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="serve-site", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    base_url = f"http://{bound_host}:{bound_port}"
    log.debug("serving %s at %s", path, base_url)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return base_url, stop


def unpack_sample_site(dest: str | Path) -> Path:
    """Unpack the embedded Node.js API docs (64 HTML pages) into `dest`; returns `dest`."""
    dest = Path(dest)
    with tarfile.open(SAMPLE_SITE) as tar:
        tar.extractall(dest, filter="data")
    return dest


def serve_sample_site(*, disallow: Sequence[str] = DEFAULT_DISALLOW,
                      crawl_delay: float | None = None, robots: str | None = None,
                      host: str = "127.0.0.1", port: int = 0) -> tuple[str, Callable[[], None]]:
    """`serve_directory` on a fresh unpacked copy of the Node.js docs; `stop()` also deletes it."""
    root = tempfile.mkdtemp(prefix="kiln-site-")
    try:
        base_url, stop_server = serve_directory(
            unpack_sample_site(root), disallow=disallow, crawl_delay=crawl_delay, robots=robots,
            host=host, port=port)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise

    def stop() -> None:
        stop_server()
        shutil.rmtree(root, ignore_errors=True)

    return base_url, stop


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.serve_site",
                                description="Serve a directory (default: the embedded Node.js API "
                                            "docs) on loopback, with a robots.txt.")
    p.add_argument("directory", nargs="?", help="directory to serve (default: the sample docs)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--disallow", action="append", metavar="PATH",
                   help=f"robots.txt Disallow path; repeatable (default: {DEFAULT_DISALLOW[0]})")
    p.add_argument("--crawl-delay", type=float, help="robots.txt Crawl-delay in seconds")
    args = p.parse_args(list(argv))
    options = {"disallow": tuple(args.disallow or DEFAULT_DISALLOW),
               "crawl_delay": args.crawl_delay, "port": args.port}
    if args.directory:
        base_url, stop = serve_directory(args.directory, **options)
    else:
        base_url, stop = serve_sample_site(**options)
    print(f"serving at {base_url}/ (robots.txt at {base_url}/robots.txt); Ctrl-C stops",
          flush=True)
    # SIGTERM (a service manager, `timeout`) stops as cleanly as Ctrl-C: the unpacked copy goes too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        threading.Event().wait()
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(entry(main))
