"""Output folders that a command owns: it records what it writes there, and deletes only that.

A command that fills a folder (the demo's `--out`, the table runner's `--out`) opens it as an
`OutputFolder`. Before writing a file or a sub-folder it `claim`s the path; the claims are kept in a
marker file in the folder (`.agree-owner.json`). Replacing the folder's content later removes the
claimed paths only: a file that the command did not write is never deleted. Claiming before writing
means that a run killed half-way still owns what it had started to write.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Iterable, Union

from agree.io import InputError, read_json, write_json

MARKER = ".agree-owner.json"
FORMAT = "agree-owner"

PathLike = Union[str, os.PathLike]


class OutputFolder:
    """A folder filled by one command (`owner`, e.g. "scripts/demo.py"), with a record of what it wrote."""

    def __init__(self, path: PathLike, owner: str):
        self.path = Path(path)
        self.owner = owner
        self._claims: list[str] = []
        self._index: set[str] = (
            set()
        )  # the claims, for lookups in constant time (thousands of files)
        self._loaded = False

    # ------------------------------------------------------------------ the record
    @property
    def marker(self) -> Path:
        """The record of what the owner wrote."""
        return self.path / MARKER

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if not self.marker.is_file():
            return
        data = read_json(self.marker)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{self.marker}: not a record of {self.owner} (unknown format)")
        if data.get("owner") != self.owner:
            raise InputError(
                f"{self.path} was written by {data.get('owner')!r}, not by {self.owner}; "
                "choose another folder"
            )
        self._claims = [str(c) for c in data.get("claims", [])]
        self._index = set(self._claims)

    def _save(self) -> None:
        """Write the record; claims sorted, so that the same claims give the same bytes."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(
            self.marker, {"format": FORMAT, "owner": self.owner, "claims": sorted(self._claims)}
        )

    @property
    def claims(self) -> list[str]:
        """Claimed paths relative to the folder; a trailing '/' claims a whole sub-folder."""
        self._load()
        return list(self._claims)

    def _rel(self, path: PathLike) -> str:
        """`path` relative to the folder: a path that lies inside the folder (absolute, or relative to the
        working directory) is taken as such; any other relative path is read relative to the folder."""
        root = self.path.resolve()
        full = Path(path).resolve()
        if full != root and root not in full.parents:
            full = (self.path / path).resolve()
        if full == root or root not in full.parents:
            raise ValueError(f"{path}: not a path inside {self.path}")
        return full.relative_to(root).as_posix()

    def claim(self, *paths: PathLike, folder: bool = False) -> None:
        """Record `paths` (files, or with `folder=True` whole sub-folders) as written by the owner."""
        self._load()
        changed = False
        for p in paths:
            rel = self._rel(p) + ("/" if folder else "")
            if rel not in self._index:
                self._claims.append(rel)
                self._index.add(rel)
                changed = True
        if changed or not self.marker.is_file():
            self._save()

    def forget(self, *rels: str) -> None:
        """Drop these claims (relative paths as `claims` lists them): paths the owner no longer has there,
        e.g. files of a sub-folder it has just replaced by a rename."""
        self._load()
        gone = set(rels) & self._index
        if gone:
            self._claims = [c for c in self._claims if c not in gone]
            self._index -= gone
            self._save()

    def owns(self, rel: str) -> bool:
        """True when the relative path `rel` (posix) is a claimed file or lies in a claimed folder."""
        self._load()
        if rel in self._index or rel + "/" in self._index:
            return True
        return any(f"{parent}/" in self._index for parent in PurePosixPath(rel).parents)

    # ------------------------------------------------------------------ the folder's content
    def foreign(self, under: str = "") -> list[str]:
        """Files (and empty folders) in the folder, or in its sub-folder `under`, that the owner did not
        write, sorted, relative to the folder."""
        self._load()
        top = self.path / under
        if not top.exists():
            return []
        if not top.is_dir():
            return [] if under and self.owns(under) else [under or "."]
        out = []
        for root, dirs, files in os.walk(top):
            base = Path(root).relative_to(self.path)
            for name in files:
                rel = (base / name).as_posix()
                if rel != MARKER and not self.owns(rel):
                    out.append(rel)
            for name in dirs:
                rel = (base / name).as_posix()
                if not any(os.scandir(Path(root) / name)) and not self.owns(rel):
                    out.append(rel + "/")
        return sorted(out)

    def check_no_foreign(self, what: str = "", under: str = "") -> None:
        """InputError naming the folder (or its sub-folder `under`) and its first foreign entries, if it
        holds anything else."""
        foreign = self.foreign(under)
        if foreign:
            shown = ", ".join(foreign[:3]) + (
                f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            )
            where = self.path / under if under else self.path
            raise InputError(
                f"{where}: holds {len(foreign)} file(s) that {self.owner} did not write ({shown}); "
                f"{what or 'it will not replace them'}: move them away or choose another folder"
            )

    def remove_owned(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete every claimed path except those in `keep` (and folders that this leaves empty);
        return what was deleted. Files the owner did not write are never touched."""
        self._load()
        keep = set(keep)
        removed = []
        for c in list(self._claims):
            if c in keep:
                continue
            target = self.path / c.rstrip("/")
            if c.endswith("/"):
                if target.is_dir():
                    shutil.rmtree(target)  # a folder claimed whole is the owner's, all of it
            elif target.is_file() or target.is_symlink():
                target.unlink()
            self._claims.remove(c)
            self._index.discard(c)
            removed.append(c)
            self._prune_empty(target.parent)
        self._save()
        return removed

    def _prune_empty(self, folder: Path) -> None:
        root = self.path.resolve()
        folder = folder.resolve()
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def scratch(self, name: str) -> Path:
        """The sub-folder `name`, claimed whole and created: where the owner writes files it deletes later
        (`remove_owned`). A `name` already there that the owner did not claim is refused, naming it."""
        rel = self._rel(name)
        if (self.path / rel).exists() and not self.owns(rel):
            raise InputError(
                f"{self.path / rel}: exists and was not written by {self.owner}; it is not used (nor "
                "deleted): move it away or choose another folder"
            )
        self.claim(rel, folder=True)
        (self.path / rel).mkdir(parents=True, exist_ok=True)
        return self.path / rel

    def replace(self) -> None:
        """Start the folder afresh: refuse if it holds anything the owner did not write, else delete what it
        wrote. A folder that does not exist is created (and owned)."""
        if self.path.exists():
            self.check_no_foreign("it replaces the folder's content")
            self.remove_owned()
        else:
            self._save()
