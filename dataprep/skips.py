"""Odd input, counted: what was skipped (allowed only up to --max-missing-fraction of its kind) and what was
absorbed (grayscale, EXIF-rotated, clipped boxes...: counted and reported, never an error)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional

from agree.io import InputError

SHOWN = 3  # messages printed per kind; the rest are counted


class SkipLog:
    """Counts skipped items per kind against a budget of floor(max_fraction x total of that kind)."""

    def __init__(self, max_fraction: float, log: Callable[[str], None] = print):
        if not 0.0 <= max_fraction <= 1.0:
            raise InputError(f"--max-missing-fraction must be between 0 and 1, got {max_fraction}")
        self.max_fraction, self.log = max_fraction, log
        self.skipped: Counter = Counter()
        self.totals: dict[str, int] = {}
        self.noted: Counter = Counter()
        self.first: dict[str, str] = {}
        self.last_skip: dict[str, str] = {}

    def total(self, kind: str, n: int) -> None:
        """Declare how many items of `kind` there are (the budget's base); checks what was skipped so far."""
        self.totals[kind] = n
        self._check(kind, self.last_skip.get(kind))

    def allowed(self, kind: str) -> Optional[int]:
        """How many items of `kind` may be skipped (None while the total is unknown)."""
        n = self.totals.get(kind)
        return None if n is None else int(math.floor(self.max_fraction * n + 1e-9))

    def skip(self, kind: str, message: str) -> None:
        """Count one skipped item; print the first few messages; stop the run once the budget is exceeded."""
        self.skipped[kind] += 1
        self.last_skip[kind] = message
        if self.skipped[kind] <= SHOWN:
            self.log(f"warning: skipped: {message}")
        self._check(kind, message)

    def _check(self, kind: str, message: Optional[str]) -> None:
        allowed = self.allowed(kind)
        n = self.skipped[kind]
        if allowed is not None and n > allowed:
            last = f"{message}\n" if message else ""
            raise InputError(
                f"{last}{n} of {self.totals[kind]} {kind} skipped, more than --max-missing-fraction "
                f"{self.max_fraction:g} allows ({allowed}); fix the input, or raise "
                "--max-missing-fraction to skip them"
            )

    def note(self, kind: str, message: str, count: int = 1) -> None:
        """Count something odd that was handled (no budget); the first message of each kind is kept."""
        if count <= 0:
            return
        self.noted[kind] += count
        self.first.setdefault(kind, message)

    def summary(self) -> list[str]:
        """One line per kind: skipped counts, then handled oddities with their first example."""
        lines = [
            f"skipped {n} of {self.totals.get(k, '?')} {k}" for k, n in sorted(self.skipped.items())
        ]
        lines += [f"{k}: {n} (e.g. {self.first[k]})" for k, n in sorted(self.noted.items())]
        return lines

    def as_dict(self) -> dict:
        """Counts for the report and the manifest."""
        return {
            "skipped": dict(sorted(self.skipped.items())),
            "noted": dict(sorted(self.noted.items())),
        }
