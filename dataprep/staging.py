"""The output folders: built under a temporary folder inside --out and renamed into place only at the end,
so a failed run leaves no partial layout. A manifest in each finished folder marks it complete; a
re-run with the same settings is a no-op unless --overwrite.

Each finished folder also records every file it holds (agree.ownership's record, beside the manifest).
A folder is replaced (--overwrite, or a Visual Genome folder rebuilt for one more dataset) only when it
holds nothing else: a folder without a manifest, or with a file that prepare_data.py did not write, is
never replaced, with or without --overwrite, and nothing in it is deleted.
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
from agree.ownership import MARKER, OutputFolder

MANIFEST = "prepare_data.json"
FORMAT = "agree-prepare-data"
OWNER = "scripts/prepare_data.py"


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


def inspect(folder: Path, overwrite: bool) -> Optional[dict]:
    """The manifest of an existing output folder, None when there is none.

    A folder that prepare_data.py did not write (no manifest) is an error, with or without --overwrite;
    with --overwrite, so is a prepared folder that holds a file prepare_data.py did not write."""
    if not folder.exists():
        return None
    m = read_manifest(folder)
    if m is None:
        raise InputError(
            f"{folder} exists and was not written by prepare_data.py (no {MANIFEST}); it is never "
            "replaced, not even with --overwrite: move it away or choose another --out"
        )
    if overwrite:
        check_replaceable(folder)
    return m


def check_replaceable(folder: Path) -> None:
    """InputError naming `folder` unless everything in it was written by prepare_data.py."""
    if not (folder / MARKER).is_file():
        raise InputError(
            f"{folder} was prepared by an older prepare_data.py, which kept no record of the files it "
            "wrote; it is not replaced: delete it yourself to rebuild it, or choose another --out"
        )
    OutputFolder(folder, OWNER).check_no_foreign(
        "prepare_data.py replaces only folders that hold nothing else"
    )


def check_settings(folder: Path, manifest: Optional[dict], settings: dict, overwrite: bool) -> bool:
    """True when `manifest` records exactly `settings`; other settings are an error without --overwrite."""
    if manifest is None:
        return False
    old = manifest.get("settings", {})
    differs = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if differs and not overwrite:
        what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(differs.items()))
        raise InputError(
            f"{folder} was prepared with other settings ({what}); pass --overwrite to rebuild it, "
            "or choose another --out"
        )
    return not differs


def write_manifest(folder: Path, settings: dict, counts: dict, **extra) -> None:
    """Mark a staged folder complete (written last), with the record of every file it holds."""
    write_json(
        folder / MANIFEST,
        {"format": FORMAT, "version": 1, "settings": settings, **extra, "counts": counts},
    )
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MARKER
    )
    OutputFolder(folder, OWNER).claim(*files)


@contextlib.contextmanager
def staging_area(out: Path, prefix: str = ".prepare_data.") -> Iterator[Path]:
    """A temporary folder inside `out` (same file system, so the final renames are atomic); removed at the end
    with anything moved aside into it, and `out` too if this run created it and it stayed empty."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def commit(targets: list[Target], stage: Path) -> None:
    """Rename each staged folder into place; a folder already there is moved aside, then deleted, when
    everything in it was written by prepare_data.py (checked for every target before any is moved)."""
    for t in targets:
        if t.final.exists():
            if read_manifest(t.final) is None:
                inspect(t.final, overwrite=False)  # the error for a folder without a manifest
            check_replaceable(t.final)
    for k, t in enumerate(targets):
        t.final.parent.mkdir(parents=True, exist_ok=True)
        if t.final.exists():
            os.replace(t.final, stage / f"replaced.{k}")
        os.replace(t.staged, t.final)
