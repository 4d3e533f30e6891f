"""The one logging set-up: `get_logger(__name__)` everywhere, `setup_logging()` once per process."""

from __future__ import annotations

import logging
import os
import sys
import warnings

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


# Libraries whose INFO lines restate what ours say, or dump whole configurations (megatron prints
# every DDP/optimizer config field and the parameter list of each gradient bucket): WARNING and
# up unless the level asked for is DEBUG.
_NOISY = ("apache_beam", "urllib3", "fsspec", "matplotlib", "datatrove", "megatron")
# Warnings that are expected here and say nothing actionable: megatron-core falls back to torch
# kernels without Apex/Transformer Engine (the CPU backend and plain-torch GPU runs use those on
# purpose; a TE run logs its spec), its DistributedOptimizer.zero_grad reads `.grad` of the
# non-leaf views it keeps over the main-gradient buffer, and its checkpoint loader calls torch
# APIs that torch has deprecated (megatron's to move off, not ours).
_EXPECTED_WARNINGS = (
    (r".*(Apex|Transformer Engine and Apex) (is|are) not installed", r"megatron\.", UserWarning),
    (r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed", r"",
     UserWarning),
    (r"`load_state_dict` is deprecated and will be removed", r"megatron\.", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", r"", FutureWarning),
)


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once; level from the argument or KILN_LOG_LEVEL (default INFO)."""
    global _configured
    level = level or os.environ.get("KILN_LOG_LEVEL", "INFO")
    level = level if isinstance(level, int) else logging.getLevelName(level.upper())
    root = logging.getLogger()
    if not _configured:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.handlers[:] = [handler]
        for message, module, category in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        _configured = True
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)
    root.setLevel(level)


def get_logger(name: str) -> logging.Logger:
    """One logger per module: `log = get_logger(__name__)`."""
    return logging.getLogger(name)
