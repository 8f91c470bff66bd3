"""Logging set-up: rank 0 logs to the console and to {run}/out.log, other ranks only warnings."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

FORMAT = "%(asctime)s | %(levelname)s | %(message)s"


def setup_logging(log_file: Optional[Path], debug: bool, is_master: bool, rank: int = 0) -> None:
    """Configure the root logger (replacing earlier handlers, so repeated runs in one process work)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = logging.DEBUG if debug else logging.INFO
    root.setLevel(level if is_master else logging.WARNING)
    fmt = logging.Formatter(
        FORMAT if is_master else f"[rank {rank}] {FORMAT}", datefmt="%Y-%m-%d,%H:%M:%S"
    )
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if is_master and log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a")
        fh.setFormatter(fmt)
        root.addHandler(fh)


def close_logging() -> None:
    """Flush and detach the handlers set up by setup_logging."""
    root = logging.getLogger()
    for h in list(root.handlers):
        h.flush()
        root.removeHandler(h)
        h.close()
