"""The output folders: built under a temporary folder inside --out and renamed into place only at the end,
so a failed run leaves no partial layout. A manifest in each finished folder marks it complete; a
re-run with the same settings is a no-op unless --overwrite.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from agree.io import InputError, read_json, write_json

MANIFEST = "prepare_data.json"
FORMAT = "agree-prepare-data"


@dataclass(frozen=True)
class Target:
    """One output folder: where it is built (`staged`) and where it goes (`final`)."""

    staged: Path
    final: Path
    what: str


def read_manifest(folder: Path) -> Optional[dict]:
    """The manifest of a finished folder, or None."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path)
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def existing_state(targets: list[Target], settings: dict) -> str:
    """'absent' (nothing there), 'done' (finished with these settings), or an InputError explaining the conflict."""
    states = []
    for t in targets:
        if not t.final.exists():
            states.append("absent")
            continue
        m = read_manifest(t.final)
        if m is None:
            raise InputError(f"{t.final} exists and was not written by prepare_data.py (no {MANIFEST}); "
                             "move it away, or pass --overwrite to replace it")
        differs = {k: (m.get("settings", {}).get(k), v) for k, v in settings.items()
                   if m.get("settings", {}).get(k) != v}
        if differs:
            what = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(differs.items()))
            raise InputError(f"{t.final} was prepared with other settings ({what}); pass --overwrite to rebuild it, "
                             "or choose another --out")
        states.append("done")
    if all(s == "done" for s in states):
        return "done"
    if any(s == "done" for s in states):
        return "partial"
    return "absent"


def write_manifest(folder: Path, settings: dict, counts: dict) -> None:
    """Mark a staged folder complete (written last)."""
    write_json(folder / MANIFEST, {"format": FORMAT, "version": 1, "settings": settings, "counts": counts})


@contextlib.contextmanager
def staging_area(out: Path) -> Iterator[Path]:
    """A temporary folder inside `out` (same file system, so the final renames are atomic); removed at the end,
    and `out` too if this run created it and it stayed empty."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare_data.", dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def commit(targets: list[Target], stage: Path) -> None:
    """Rename each staged folder into place; a folder already there (--overwrite) is moved aside, then deleted."""
    for k, t in enumerate(targets):
        t.final.parent.mkdir(parents=True, exist_ok=True)
        if t.final.exists():
            os.replace(t.final, stage / f"replaced.{k}")
        os.replace(t.staged, t.final)
