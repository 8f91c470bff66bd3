"""Ranked-list files: ground truth and predictions (`{key: id, "item_ids": [...]}` per line)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from agree.io import InputError, atomic_write, dumps, iter_jsonl

QUERY_KEYS = ("query_id", "image_id")
FOLD_KEY = "fold"


@dataclass
class RankedLists:
    """Rows of one file: query ids and item-id lists as given, plus a string-id index."""

    path: Path
    key: str
    ids: list = field(default_factory=list)
    items: list[list] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)  # str(query id) -> row
    folds: list[int] | None = (
        None  # each row's test fold, when the file records them (eval/folds.py)
    )

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, query: Any) -> list | None:
        """Item list of `query` (compared by string form), or None."""
        row = self.index.get(str(query))
        return None if row is None else self.items[row]


def check_key(key: str) -> str:
    """Validate a query key name (`query_id` or `image_id`)."""
    if key not in QUERY_KEYS:
        raise InputError(f"key must be one of {', '.join(QUERY_KEYS)}, got {key!r}")
    return key


def read_ranked_lists(path: str | os.PathLike, key: str, what: str = "predictions") -> RankedLists:
    """Read ground truth or predictions; a list entry `[id, scores...]` counts as `id`."""
    out = RankedLists(Path(path), key)
    for lineno, rec in iter_jsonl(path, required=(key, "item_ids")):
        items = rec["item_ids"]
        if not isinstance(items, list):
            raise InputError(f"{path}:{lineno}: 'item_ids' must be a list")
        if any(isinstance(x, list) for x in items):
            try:
                items = [x[0] if isinstance(x, list) else x for x in items]
            except IndexError:
                raise InputError(f"{path}:{lineno}: empty entry in 'item_ids'") from None
        qid = rec[key]
        if isinstance(qid, (list, dict)) or qid is None:
            raise InputError(f"{path}:{lineno}: {key!r} must be a string or a number, got {qid!r}")
        s = str(qid)
        if s in out.index:
            raise InputError(
                f"{path}:{lineno}: duplicate {key} {qid!r} (first on line {out.lines[out.index[s]]})"
            )
        _read_fold(out, rec, lineno)
        out.index[s] = len(out.ids)
        out.ids.append(qid)
        out.items.append(items)
        out.lines.append(lineno)
    if not out.ids:
        raise InputError(f"{path}: no {what} (file is empty)")
    return out


def _read_fold(out: RankedLists, rec: dict, lineno: int) -> None:
    fold = rec.get(FOLD_KEY)
    if (fold is None) != (out.folds is None) and out.ids:
        raise InputError(f"{out.path}:{lineno}: {FOLD_KEY!r} present on some lines only")
    if fold is None:
        return
    if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
        raise InputError(
            f"{out.path}:{lineno}: {FOLD_KEY!r} must be a non-negative integer, got {fold!r}"
        )
    if out.folds is None:
        out.folds = []
    out.folds.append(fold)


def write_ranked_lists(*outputs: tuple[str | os.PathLike, str, Iterable[tuple]]) -> None:
    """Write each `(path, key, rows)`: a row `(id, items)` as `{key: id, "item_ids": items}`, a row
    `(id, items, fold)` with `"fold": fold` added.

    All files appear together at the end, or none of them if anything fails.
    """
    with contextlib.ExitStack() as stack:
        for path, key, rows in outputs:
            f = stack.enter_context(atomic_write(path))
            f.write(b"".join(dumps(_record(key, row)) + b"\n" for row in rows))


def _record(key: str, row: tuple) -> dict:
    rec = {key: row[0], "item_ids": row[1]}
    if len(row) > 2:
        rec[FOLD_KEY] = row[2]
    return rec


def as_ranked_lists(path: str | os.PathLike, key: str, rows: list[tuple]) -> RankedLists:
    """RankedLists view of rows built in memory (line numbers = row numbers), folds from 3-tuples."""
    out = RankedLists(Path(path), key)
    for i, row in enumerate(rows):
        qid, items = row[0], row[1]
        out.index[str(qid)] = i
        out.ids.append(qid)
        out.items.append(items)
        out.lines.append(i + 1)
    if rows and len(rows[0]) > 2:
        out.folds = [row[2] for row in rows]
    return out
