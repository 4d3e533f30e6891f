"""The one logging set-up: `get_logger(__name__)` everywhere, `setup_logging()` once per process."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(rank)s%(name)s: %(message)s"
_configured = False


class _RankFilter(logging.Filter):
    """Prefix records with the distributed rank when torchrun launched us."""

    def __init__(self) -> None:
        super().__init__()
        rank = os.environ.get("RANK")
        self.prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.prefix
        return True


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once; level from the argument or KILN_LOG_LEVEL (default INFO)."""
    global _configured
    level = level or os.environ.get("KILN_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.handlers[:] = [handler]
        for noisy in ("apache_beam", "urllib3", "fsspec", "matplotlib", "datatrove"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        _configured = True
    root.setLevel(level if isinstance(level, int) else level.upper())


def get_logger(name: str) -> logging.Logger:
    """One logger per module: `log = get_logger(__name__)`."""
    return logging.getLogger(name)
