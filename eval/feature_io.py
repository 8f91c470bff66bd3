"""Feature files: JSONL (the release's format) and a binary `.npy` + ids sidecar format.

JSONL: one record per line, `{"image_id": id, "feature": [...]}` or, for entity
slot files, `{"query_id": q, "feature": [[...] x S], "n_real_slots": n}`
(`n_real_slots` is optional; the release does not write it).

Binary, chosen by the `.npy` extension: `X.npy` holds the float matrix
([N, D], or [N, S, D] for slot files) and `X.ids.json` beside it holds
`{"format": "agree-features", "version": 1, "key": "image_id", "ids": [...],
"n_real_slots": [...]}` (the last entry only for slot files that record it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agree.io import (
    InputError,
    atomic_path,
    atomic_write,
    dumps,
    iter_jsonl,
    read_json,
    require_file,
)

SIDECAR_FORMAT = "agree-features"
SIDECAR_VERSION = 1
N_REAL_KEY = "n_real_slots"


@dataclass
class Features:
    """Features of one file: ids as given, float32 matrix, optional real-slot counts."""

    path: Path
    key: str
    ids: list
    data: np.ndarray  # float32, [N, D] or [N, S, D]; read-only when mapped from a .npy file
    n_real: np.ndarray | None = None  # int64 [N], slot files only

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.data.shape[-1])

    @property
    def n_slots(self) -> int:
        """Slots per row S (slot files only)."""
        return int(self.data.shape[1])

    def str_ids(self) -> list[str]:
        """Ids in their string form (two ids are the same id when their string forms are equal)."""
        return [str(i) for i in self.ids]


def is_binary(path: str | os.PathLike) -> bool:
    """True when `path` names the binary format (`.npy`)."""
    return str(path).lower().endswith(".npy")


def sidecar_path(path: str | os.PathLike) -> Path:
    """Ids file that accompanies a binary feature matrix: `X.npy` -> `X.ids.json`."""
    p = Path(path)
    return p.with_name(p.name[: -len(".npy")] + ".ids.json")


def read_features(path: str | os.PathLike, key: str, slots: bool = False) -> Features:
    """Read a feature file (format by extension); `slots` expects [S, D] per row."""
    if is_binary(path):
        feats = _read_npy(Path(path), key, slots)
    else:
        feats = _read_jsonl(Path(path), key, slots)
    _check_unique(feats)
    return feats


def _read_jsonl(path: Path, key: str, slots: bool) -> Features:
    ids: list = []
    rows: list[np.ndarray] = []
    n_real: list[int] = []
    shape: tuple[int, ...] | None = None
    first_line = 0
    has_n_real: bool | None = None
    want_ndim = 2 if slots else 1
    try:
        for lineno, rec in iter_jsonl(path, required=(key, "feature")):
            try:  # one conversion per line: faster than batching nested lists, and locates errors
                row = np.asarray(rec["feature"], dtype=np.float32)
            except (TypeError, ValueError):
                raise InputError(
                    f"{path}:{lineno}: 'feature' must be {_FEATURE_LAYOUT[slots]}"
                ) from None
            if row.ndim != want_ndim:
                raise InputError(f"{path}:{lineno}: 'feature' must be {_FEATURE_LAYOUT[slots]}")
            if shape is None:
                if 0 in row.shape:
                    raise InputError(f"{path}:{lineno}: 'feature' is empty")
                shape, first_line = row.shape, lineno
            elif row.shape != shape:
                raise InputError(
                    f"{path}:{lineno}: feature has shape {list(row.shape)}, "
                    f"expected {list(shape)} as on line {first_line}"
                )
            if not np.isfinite(row).all():
                raise InputError(f"{path}:{lineno}: feature holds NaN, infinite or null values")
            if slots:
                rec_has = N_REAL_KEY in rec
                if has_n_real is None:
                    has_n_real = rec_has
                elif rec_has != has_n_real:
                    raise InputError(f"{path}:{lineno}: {N_REAL_KEY!r} present on some lines only")
                if rec_has:
                    n_real.append(_check_n_real(rec[N_REAL_KEY], shape[0], f"{path}:{lineno}"))
            ids.append(rec[key])
            rows.append(row)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not ids:
        raise InputError(f"{path}: no features (file is empty)")
    return Features(
        path, key, ids, np.stack(rows), np.asarray(n_real, dtype=np.int64) if has_n_real else None
    )


_FEATURE_LAYOUT = {
    False: "a flat list of numbers",
    True: "a list of equal-length lists of numbers (one per entity slot)",
}


def _check_n_real(value: Any, n_slots: int, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= n_slots:
        raise InputError(
            f"{where}: {N_REAL_KEY!r} must be an integer in [0, {n_slots}], got {value!r}"
        )
    return value


def _read_npy(path: Path, key: str, slots: bool) -> Features:
    require_file(path, "feature file")
    side = sidecar_path(path)
    meta = read_json(require_file(side, f"ids file of {path.name}"))
    if not isinstance(meta, dict) or not isinstance(meta.get("ids"), list) or "key" not in meta:
        raise InputError(f"{side}: expected an object with 'key' and 'ids' (a list)")
    if meta["key"] != key:
        raise InputError(f"{side}: holds {meta['key']!r} features, expected {key!r}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from None
    want_ndim = 3 if slots else 2
    if arr.ndim != want_ndim:
        raise InputError(f"{path}: matrix has {arr.ndim} dimensions, expected {want_ndim}")
    if arr.dtype.kind != "f":
        raise InputError(f"{path}: matrix dtype {arr.dtype} is not floating point")
    if arr.shape[0] == 0 or 0 in arr.shape:
        raise InputError(f"{path}: no features (matrix shape {list(arr.shape)})")
    ids = meta["ids"]
    if len(ids) != arr.shape[0]:
        raise InputError(f"{side}: {len(ids)} ids for {arr.shape[0]} feature rows in {path.name}")
    # float32 files stay mapped (read-only, no copy: the page cache serves them); others are converted
    data = np.asarray(arr) if arr.dtype == np.float32 else np.asarray(arr, dtype=np.float32)
    bad = non_finite_rows(data)
    if len(bad):
        i = int(bad[0])
        raise InputError(f"{path}: row {i} (id {ids[i]!r}) holds NaN or infinite values")
    n_real = None
    if slots and meta.get(N_REAL_KEY) is not None:
        counts = meta[N_REAL_KEY]
        if not isinstance(counts, list) or len(counts) != len(ids):
            raise InputError(f"{side}: {N_REAL_KEY!r} must be a list with one count per id")
        n_real = np.asarray(
            [_check_n_real(c, data.shape[1], str(side)) for c in counts], dtype=np.int64
        )
    return Features(path, key, list(ids), data, n_real)


def non_finite_rows(data: np.ndarray) -> np.ndarray:
    """Indices of the rows of `data` that hold a NaN or an infinity."""
    flat = data.reshape(len(data), -1)
    # a row sum is finite when every entry is (bar float32 overflow): only suspect rows are checked
    # entry by entry, which spares a boolean copy of the whole matrix
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = np.flatnonzero(~np.isfinite(flat.sum(axis=1)))
    return suspect[~np.isfinite(flat[suspect]).all(axis=1)]


def _check_unique(feats: Features) -> None:
    seen: set[str] = set()
    for i, x in enumerate(feats.ids):
        s = str(x)
        if s in seen:
            raise InputError(f"{feats.path}: duplicate {feats.key} {x!r} (row {i + 1})")
        seen.add(s)


class FeatureWriter:
    """Stream feature rows into a file (format by extension); it appears only on success.

    Use as a context manager: `with FeatureWriter(path, "image_id") as w: w.add(ids, array)`.
    """

    def __init__(self, path: str | os.PathLike, key: str, slots: bool = False):
        self.path = Path(path)
        self.key = key
        self.slots = slots
        self._stack = contextlib.ExitStack()
        self._ids: list = []
        self._blocks: list[np.ndarray] = []
        self._n_real: list[int] = []
        self._file = None

    def __enter__(self) -> "FeatureWriter":
        if not is_binary(self.path):
            self._file = self._stack.enter_context(atomic_write(self.path))
        return self

    def add(self, ids: Sequence, data: np.ndarray, n_real: Sequence[int] | None = None) -> None:
        """Append rows; `data` is [B, D] (or [B, S, D] for slot files)."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim != (3 if self.slots else 2) or len(ids) != len(data):
            raise ValueError(f"FeatureWriter.add: bad shape {data.shape} for {len(ids)} ids")
        if self._file is not None:
            lines = []
            for i, x in enumerate(ids):
                rec = {self.key: x, "feature": data[i]}
                if n_real is not None:
                    rec[N_REAL_KEY] = int(n_real[i])
                lines.append(dumps(rec))
            lines.append(b"")
            self._file.write(b"\n".join(lines))
        else:
            self._blocks.append(data)
        self._ids.extend(ids)
        if n_real is not None:
            self._n_real.extend(int(n) for n in n_real)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is None:  # binary: everything is written (atomically) at the end
            if exc_type is None:
                self._write_binary()
            return
        self._stack.__exit__(exc_type, exc, tb)

    def _write_binary(self) -> None:
        if not self._blocks:
            raise ValueError("FeatureWriter: no rows to write")
        data = np.concatenate(self._blocks)
        meta: dict[str, Any] = {
            "format": SIDECAR_FORMAT,
            "version": SIDECAR_VERSION,
            "key": self.key,
            "ids": self._ids,
        }
        if self.slots and self._n_real:
            meta[N_REAL_KEY] = self._n_real
        with atomic_path(self.path) as tmp_npy, atomic_write(sidecar_path(self.path)) as side:
            np.save(tmp_npy, data, allow_pickle=False)
            side.write(dumps(meta))


def write_features(path: str | os.PathLike, feats: Features) -> None:
    """Write a whole Features object (format by extension of `path`)."""
    slots = feats.data.ndim == 3
    with FeatureWriter(path, feats.key, slots) as w:
        for start in range(0, len(feats), 4096):
            stop = start + 4096
            n_real = feats.n_real[start:stop] if feats.n_real is not None else None
            w.add(feats.ids[start:stop], feats.data[start:stop], n_real)


def align_slots(text: Features, slot_feats: Features) -> Features:
    """Reorder a slot file's rows to follow `text`'s query order; every query must be present."""
    if slot_feats.str_ids() == text.str_ids():
        return slot_feats
    pos = {s: i for i, s in enumerate(slot_feats.str_ids())}
    order = []
    for q in text.ids:
        i = pos.get(str(q))
        if i is None:
            raise InputError(
                f"{slot_feats.path}: no entry for query {q!r} (present in {text.path})"
            )
        order.append(i)
    idx = np.asarray(order, dtype=np.int64)
    n_real = slot_feats.n_real[idx] if slot_feats.n_real is not None else None
    return Features(
        slot_feats.path,
        slot_feats.key,
        [slot_feats.ids[i] for i in order],
        slot_feats.data[idx],
        n_real,
    )


def check_same_dim(*feats: Features) -> None:
    """All feature sets share one dimension D, else InputError naming both files."""
    first = feats[0]
    for f in feats[1:]:
        if f.dim != first.dim:
            raise InputError(
                f"{f.path}: feature dimension {f.dim} differs from {first.dim} in {first.path}"
            )


def read_retrieval_features(
    image_path: str | os.PathLike, text_path: str | os.PathLike
) -> tuple[Features, Features]:
    """Image (`image_id`) and text (`query_id`) features of one test set, same dimension."""
    image = read_features(image_path, "image_id")
    text = read_features(text_path, "query_id")
    check_same_dim(image, text)
    return image, text


def read_slot_features(path: str | os.PathLike, text: Features) -> Features:
    """Entity-slot features ([S, D] per query) aligned to `text`'s query order."""
    slots = read_features(path, "query_id", slots=True)
    check_same_dim(text, slots)
    return align_slots(text, slots)


def detect_layout(path: str | os.PathLike) -> tuple[str, bool]:
    """(id key, slot file?) of a feature file, from its first record or its ids file."""
    p = Path(path)
    if is_binary(p):
        meta = read_json(require_file(sidecar_path(p), f"ids file of {p.name}"))
        key = meta.get("key") if isinstance(meta, dict) else None
        try:
            ndim = np.load(require_file(p, "feature file"), mmap_mode="r", allow_pickle=False).ndim
        except (ValueError, OSError, EOFError) as e:
            raise InputError(f"{p}: not a readable .npy file ({e})") from None
        slots = ndim == 3
    else:
        for lineno, rec in iter_jsonl(p, required=("feature",)):
            key = next((k for k in ("image_id", "query_id") if k in rec), None)
            if key is None:
                raise InputError(f"{p}:{lineno}: missing key 'image_id' or 'query_id'")
            feat = rec["feature"]
            slots = isinstance(feat, list) and bool(feat) and isinstance(feat[0], list)
            break
        else:
            raise InputError(f"{p}: no features (file is empty)")
    if key not in ("image_id", "query_id"):
        raise InputError(f"{sidecar_path(p)}: 'key' must be image_id or query_id")
    return key, slots
