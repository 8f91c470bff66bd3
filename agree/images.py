"""Lazy, fork-safe access to images stored in an `.npz` archive (one array per key), and masked images read
from an archive of masked copies or drawn from mask boxes (agree.masks) over an archive."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from agree.io import InputError
from agree.masks import MaskBoxes, fill_boxes
from agree.pixels import normalised
from clip.transform import array_to_tensor


class ImageArchive:
    """Read single images from an `.npz` archive without loading the whole archive.

    The zip handle is reopened in each process, so the object can be shared with
    DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, what: str = "image archive"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{what} not found: {self.path}")
        self._npz = None
        self._pid = -1
        try:
            self._keys = list(self._handle().files)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise InputError(f"{self.path}: not a readable .npz archive ({e})") from None
        self._key_set = set(self._keys)

    def _handle(self) -> np.lib.npyio.NpzFile:
        if self._npz is None or self._pid != os.getpid():
            self._npz = np.load(self.path, allow_pickle=False)
            self._pid = os.getpid()
        return self._npz

    def keys(self) -> list[str]:
        """All image keys, in archive order."""
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._key_set

    def __getitem__(self, key: object) -> np.ndarray:
        key = str(key)
        if key not in self._key_set:
            raise InputError(f"{self.path}: no image with key {key!r}")
        try:
            return self._handle()[key]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise InputError(f"{self.path}: cannot read image {key!r} ({e})") from None

    def load_tensor(self, key: object, resolution: int, is_train: bool = False) -> torch.Tensor:
        """Image `key` preprocessed for a model of input size `resolution` (see array_to_tensor)."""
        try:
            return array_to_tensor(self[key], resolution, is_train)
        except ValueError as e:
            raise InputError(f"{self.path}: image {str(key)!r}: {e}") from None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_npz"], state["_pid"] = None, -1
        return state


Reader = Callable[[ImageArchive, str], np.ndarray]


def read_normalised(archive: ImageArchive, key: str) -> np.ndarray:
    """Image `key` of `archive` as CLIP-normalised float32 (3, R, R) (agree.pixels.normalised)."""
    try:
        return normalised(archive[key])
    except ValueError as e:
        raise InputError(f"{archive.path}: image {key!r}: {e}") from None


class MaskedImages:
    """Masked images by key, from an archive of masked copies or from mask boxes over an archive of images.

    `kind` is "images" or "boxes"; `what` names one item in messages ("grounding image", "grounding mask")."""

    kind: str
    path: Path

    def __contains__(self, key: object) -> bool:
        raise NotImplementedError

    def __getitem__(self, key: object) -> np.ndarray:
        """The masked image as stored (uint8 or float, like its archive)."""
        raise NotImplementedError

    def normalised(self, key: str, read: Reader = read_normalised) -> np.ndarray:
        """The masked image as CLIP-normalised float32 (3, R, R); archives are read through `read`."""
        raise NotImplementedError


class MaskedArchive(MaskedImages):
    """The release's form: an `.npz` archive of masked copies."""

    kind = "images"

    def __init__(self, archive: ImageArchive):
        self.archive, self.path = archive, archive.path

    def __contains__(self, key: object) -> bool:
        return key in self.archive

    def __getitem__(self, key: object) -> np.ndarray:
        return self.archive[key]

    def normalised(self, key: str, read: Reader = read_normalised) -> np.ndarray:
        return read(self.archive, key)


class BoxMasks(MaskedImages):
    """Masks drawn at load time: a mask-box file (agree.masks) over the archive of the unmasked images."""

    kind = "boxes"

    def __init__(self, boxes: MaskBoxes, base: ImageArchive):
        self.boxes, self.base, self.path = boxes, base, boxes.path

    def __contains__(self, key: object) -> bool:
        return key in self.boxes and self.boxes.image_id(key) in self.base

    def __getitem__(self, key: object) -> np.ndarray:
        return self._fill(self.base[self.boxes.image_id(key)], key)

    def normalised(self, key: str, read: Reader = read_normalised) -> np.ndarray:
        return self._fill(read(self.base, self.boxes.image_id(key)), key)

    def _fill(self, array: np.ndarray, key: object) -> np.ndarray:
        try:
            return fill_boxes(array, self.boxes.boxes(key))
        except ValueError as e:
            raise InputError(f"{self.path}: mask {str(key)!r}: {e}") from None
