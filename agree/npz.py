"""A streaming `.npz` writer: one array at a time, fixed timestamps, so the same arrays give the same bytes."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class NpzWriter:
    """Write arrays into an uncompressed .npz that np.load (and agree.images.ImageArchive) read lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zf = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._keys: set[str] = set()

    def add(self, key: str, array: np.ndarray) -> None:
        """Store `array` under `key`; a key may be written once."""
        if key in self._keys:
            raise ValueError(f"{self.path}: duplicate key {key!r}")
        self._keys.add(key)
        info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        with self._zf.open(info, "w") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Write the zip directory."""
        self._zf.close()
