"""WARC output: one gzip member per record, one fsync'd write per fetched URL, size-based rotation.

Each fetched URL is one *transaction* of three records written with a single `write()`:
`response`, `request` (WARC-Concurrent-To the response) and a closing `metadata` record (via,
hopsFromSeed, outlinks, as Heritrix writes them). A transaction that ends in its metadata record is
complete, which is what lets crash recovery tell a whole transaction from a torn one.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from warcio.statusandheaders import StatusAndHeaders
from warcio.timeutils import datetime_to_iso_date
from warcio.warcwriter import WARCWriter

from dataprep.crawl.fetch import Exchange

WARC_NAME = re.compile(r"^(?P<prefix>.+)-(?P<stamp>\d{14})-(?P<serial>\d{5})\.warc\.gz$")


@dataclass
class PageRecord:
    """What the crawl learnt from one archived response: enough to resume the crawl from it."""

    url: str
    depth: int
    redirects: int = 0
    via: str = ""
    status: int = 0
    size: int = 0
    truncated: bool = False
    outlinks: list[str] = field(default_factory=list)
    redirect: str | None = None

    def metadata_fields(self, fetch_ms: int) -> bytes:
        lines = [f"via: {self.via}", f"hopsFromSeed: {self.depth}",
                 f"redirectHops: {self.redirects}", f"fetchTimeMs: {fetch_ms}"]
        if self.redirect:
            lines.append(f"redirect: {self.redirect}")
        lines += [f"outlink: {link}" for link in self.outlinks]
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    @classmethod
    def from_metadata(cls, url: str, fields: bytes, status: int, size: int,
                      truncated: bool) -> PageRecord:
        page = cls(url=url, depth=0, status=status, size=size, truncated=truncated)
        for line in fields.decode("utf-8").splitlines():
            key, _, value = line.partition(": ")
            if key == "via":
                page.via = value
            elif key == "hopsFromSeed":
                page.depth = int(value)
            elif key == "redirectHops":
                page.redirects = int(value)
            elif key == "redirect":
                page.redirect = value
            elif key == "outlink":
                page.outlinks.append(value)
        return page


@dataclass(frozen=True)
class WarcLocation:
    file: str  # base name inside the output directory
    offset: int
    end: int


class WarcFileWriter:
    """Appends transactions to `DIR/PREFIX-TIMESTAMP-SERIAL.warc.gz`, rotating past `max_bytes`."""

    def __init__(self, directory: str, prefix: str, max_bytes: int, user_agent: str,
                 warc_version: str = "1.1") -> None:
        self.directory = directory
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.user_agent = user_agent
        self.warc_version = warc_version
        self._file: io.BufferedWriter | None = None
        self._name = ""
        self._size = 0
        self._warcinfo_id = ""
        self._has_records = False
        self._serial = max((s for _, s in list_warc_files(directory, prefix)), default=0)

    def write_page(self, page: PageRecord, exchange: Exchange, fetch_ms: int) -> WarcLocation:
        """Archive one fetched URL (response, request, metadata) durably; return where it lies."""
        if self._file is None or (self._has_records and self._size >= self.max_bytes):
            self._open_next()
        writer = WARCWriter(io.BytesIO(), gzip=True, warc_version=self.warc_version)
        date = _warc_date(exchange.date, self.warc_version)
        common = {"WARC-Date": date, "WARC-Warcinfo-ID": self._warcinfo_id}
        response_headers = {**common, "WARC-IP-Address": exchange.ip}
        if exchange.truncated:
            response_headers["WARC-Truncated"] = "length"
        response = writer.create_warc_record(
            exchange.url, "response", payload=io.BytesIO(exchange.body), length=len(exchange.body),
            http_headers=StatusAndHeaders(f"{exchange.status} {exchange.reason}".strip(),
                                          exchange.headers, protocol=exchange.protocol),
            warc_headers_dict=response_headers)
        response_id = response.rec_headers.get_header("WARC-Record-ID")
        linked = {**common, "WARC-Concurrent-To": response_id}
        request = writer.create_warc_record(
            exchange.url, "request", payload=io.BytesIO(exchange.request),
            length=len(exchange.request), warc_headers_dict={**linked, "WARC-IP-Address": exchange.ip})
        fields = page.metadata_fields(fetch_ms)
        metadata = writer.create_warc_record(
            exchange.url, "metadata", payload=io.BytesIO(fields), length=len(fields),
            warc_content_type="application/warc-fields", warc_headers_dict=linked)
        for record in (response, request, metadata):
            writer.write_record(record)
        location = self._append(writer.out.getvalue())
        self._has_records = True
        return location

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_next(self) -> None:
        self.close()
        self._serial += 1
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        self._name = f"{self.prefix}-{stamp}-{self._serial:05d}.warc.gz"
        self._file = open(os.path.join(self.directory, self._name), "xb")  # noqa: SIM115
        self._size = 0
        self._has_records = False
        writer = WARCWriter(io.BytesIO(), gzip=True, warc_version=self.warc_version)
        info = writer.create_warcinfo_record(self._name, {
            "software": "llmkiln crawl",
            "format": f"WARC File Format {self.warc_version}",
            "http-header-user-agent": self.user_agent,
            "robots": "obey",
            "isPartOf": self.prefix,
        })
        self._warcinfo_id = info.rec_headers.get_header("WARC-Record-ID")
        writer.write_record(info)
        self._append(writer.out.getvalue())
        _fsync_dir(self.directory)

    def _append(self, data: bytes) -> WarcLocation:
        assert self._file is not None
        offset = self._size
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._size += len(data)
        return WarcLocation(self._name, offset, self._size)


def list_warc_files(directory: str, prefix: str) -> list[tuple[str, int]]:
    """(name, serial) of the crawl's `PREFIX-TIMESTAMP-SERIAL.warc.gz` files, in serial order.

    Other WARC files in the directory are never touched, so pointing --out at a folder that
    already holds someone else's archives cannot harm them.
    """
    out = []
    for name in os.listdir(directory):
        match = WARC_NAME.match(name)
        if match and match.group("prefix") == prefix:
            out.append((name, int(match.group("serial"))))
    return sorted(out, key=lambda item: item[1])


def _warc_date(when: datetime, warc_version: str) -> str:
    return datetime_to_iso_date(when.astimezone(UTC).replace(tzinfo=None),
                                use_micros=warc_version == "1.1")


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
