"""Plain text of the committed Node.js docs sample (`jobs/sample_data/nodejs-api-html.tar.gz`),
shared by `bench/tokenize.py` and the tokenize job tests: every text node outside <script> and
<style>, nothing dropped (a tokenizer workload, not main-content extraction)."""

from __future__ import annotations

import html.parser
import os
import tarfile

NODE_DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs",
                         "sample_data", "nodejs-api-html.tar.gz")


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _Text()
    parser.feed(page)
    return "".join(parser.parts)


def node_doc_texts(limit: int | None = None) -> list[str]:
    """The text of the first `limit` pages (all by default), in file-name order."""
    with tarfile.open(NODE_DOCS) as tar:
        pages = sorted(m.name for m in tar.getmembers() if m.name.endswith(".html"))[:limit]
        return [html_text(tar.extractfile(name).read().decode("utf-8")) for name in pages]
