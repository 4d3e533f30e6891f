"""The loopback site server used by crawl tests and the demo."""

from __future__ import annotations

import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs.serve_site import robots_txt, serve_directory, serve_sample_site


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_serve_directory_serves_files_and_a_robots_txt(tmp_path: Path) -> None:
    (tmp_path / "a.html").write_text("<html>a</html>")
    base, stop = serve_directory(tmp_path, disallow=["/secret/", "/b.html"], crawl_delay=0.5)
    try:
        assert base.startswith("http://127.0.0.1:")
        assert _get(f"{base}/a.html") == (200, "text/html", b"<html>a</html>")
        status, ctype, body = _get(f"{base}/robots.txt")
        assert (status, ctype) == (200, "text/plain; charset=utf-8")
        assert body.decode() == "User-agent: *\nDisallow: /secret/\nDisallow: /b.html\nCrawl-delay: 0.5\n"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(f"{base}/missing.html")
    finally:
        stop()
    with pytest.raises(urllib.error.URLError):
        _get(f"{base}/a.html")


def test_robots_can_be_given_verbatim_or_left_out(tmp_path: Path) -> None:
    base, stop = serve_directory(tmp_path, robots="")
    try:
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(f"{base}/robots.txt")
    finally:
        stop()
    assert robots_txt([]) == "User-agent: *\nDisallow:\n"


def test_sample_site_is_the_nodejs_docs_and_stop_removes_the_copy() -> None:
    def copies() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("kiln-site-*"))

    before = copies()
    base, stop = serve_sample_site()
    try:
        mine = copies() - before
        assert len(mine) == 1 and len(list(next(iter(mine)).glob("*.html"))) == 64
        status, _, body = _get(f"{base}/fs.html")
        assert status == 200 and b"<title>File system" in body
        assert b"Disallow: /deprecations.html" in _get(f"{base}/robots.txt")[2]
    finally:
        stop()
    assert not any(path.exists() for path in mine)
