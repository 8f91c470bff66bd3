"""Masks: which pixels of a stored image a mask covers, the one fill both dataprep and fine-tuning use, and
the mask-box files (`*.boxes.jsonl`) that replace the archives of masked copies.

A mask is a set of pixel boxes [x0, y0, x1, y1] in the stored image's pixels (after the resize and
centre crop): integers, x0 < x1 and y0 < y1, covering the pixels x0 <= x < x1, y0 <= y < y1, exactly
the pixels that are filled. The fill is CLIP's mean colour: FILL_RGB in a uint8 (H, W, 3) image, and
in a float (3, H, W) image the value `agree.pixels.normalise` maps FILL_RGB to. So filling a uint8 image
and normalising it gives the same bits as normalising it and filling the float image, and a masked
copy written by `prepare_data.py --masks images` is, bit for bit, what fine-tuning computes at load
time from the unmasked image and the boxes of `--masks boxes`, in either storage.

A mask-box file has one JSON line per masked key:
`{"key": "<masked key>", "image_id": "<key of the unmasked image in its archive>", "boxes": [[x0, y0, x1, y1], ...]}`.

Imported by dataprep's worker processes: nothing here imports torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from agree.io import InputError, iter_jsonl
from agree.pixels import CLIP_MEAN, is_normalised, is_rgb_uint8, normalised_value, unsupported

PixelBox = tuple[int, int, int, int]
FILL_RGB: tuple[int, int, int] = tuple(int(round(m * 255)) for m in CLIP_MEAN)  # (123, 117, 104)
FILL_NORMALISED = normalised_value(FILL_RGB)  # float32 (3,): FILL_RGB normalised
RECORD_KEYS = ("key", "image_id", "boxes")


def pixel_box(box: Sequence[float], width: int, height: int) -> Optional[PixelBox]:
    """Every pixel a continuous box (x0, y0, x1, y1) touches, clipped to a width x height image; None when
    nothing of it is inside."""
    x0, y0, x1, y1 = box
    out = (
        max(int(math.floor(x0)), 0),
        max(int(math.floor(y0)), 0),
        min(int(math.ceil(x1)), width),
        min(int(math.ceil(y1)), height),
    )
    return out if out[2] > out[0] and out[3] > out[1] else None


def fill_boxes(array: np.ndarray, boxes: Iterable[Sequence[int]]) -> np.ndarray:
    """Copy of a stored image with every pixel of each pixel box set to CLIP's mean colour (see the module doc).

    ValueError for a box that is not integer corners inside the image, or an array of neither stored form."""
    channels_last = is_rgb_uint8(array)
    if channels_last:
        height, width = array.shape[:2]
        fill = np.asarray(FILL_RGB, np.uint8)
    elif is_normalised(array):
        height, width = array.shape[1:]
        fill = FILL_NORMALISED.astype(array.dtype)[:, None, None]
    else:
        raise unsupported(array)
    out = array.copy()
    for box in boxes:
        x0, y0, x1, y1 = check_box(box, width, height)
        if channels_last:
            out[y0:y1, x0:x1] = fill
        else:
            out[:, y0:y1, x0:x1] = fill
    return out


def check_box(box: object, width: Optional[int] = None, height: Optional[int] = None) -> PixelBox:
    """`box` as a PixelBox; ValueError unless it is four integers with 0 <= x0 < x1 (<= width), same for y."""
    if (
        not isinstance(box, (list, tuple, np.ndarray))
        or len(box) != 4
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(f"a mask box must be four integers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise ValueError(
            f"mask box {list(box)} is empty or negative (needs 0 <= x0 < x1, 0 <= y0 < y1)"
        )
    if width is not None and height is not None and (x1 > width or y1 > height):
        raise ValueError(f"mask box {list(box)} lies outside the {width}x{height} image")
    return x0, y0, x1, y1


def record(key: str, image_id: object, boxes: Iterable[Sequence[int]]) -> dict:
    """One line of a mask-box file."""
    return {"key": key, "image_id": str(image_id), "boxes": [list(check_box(b)) for b in boxes]}


class MaskBoxes:
    """A mask-box file in memory: masked key -> (image id, pixel boxes); compact (one int32 array of boxes)."""

    def __init__(self, path: str | os.PathLike, what: str = "mask boxes"):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{what} not found: {self.path}")
        index: dict[str, int] = {}
        image_ids: list[str] = []
        offsets = [0]
        flat: list[PixelBox] = []
        for lineno, rec in iter_jsonl(self.path, RECORD_KEYS):
            where = f"{self.path}:{lineno}"
            key, image_id, boxes = rec["key"], rec["image_id"], rec["boxes"]
            if not isinstance(key, str) or not key:
                raise InputError(f"{where}: 'key' must be a non-empty string")
            if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
                raise InputError(f"{where}: 'image_id' must be a string (the image's archive key)")
            if not isinstance(boxes, list) or not boxes:
                raise InputError(f"{where}: 'boxes' must be a non-empty list of [x0, y0, x1, y1]")
            if key in index:
                raise InputError(f"{where}: duplicate key {key!r}")
            try:
                flat += [check_box(b) for b in boxes]
            except ValueError as e:
                raise InputError(f"{where}: {e}") from None
            index[key] = len(image_ids)
            image_ids.append(str(image_id))
            offsets.append(len(flat))
        self._index = index
        self._image_ids = image_ids
        self._offsets = np.asarray(offsets, np.int64)
        self._boxes = np.asarray(flat, np.int32).reshape(-1, 4)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._index

    def __len__(self) -> int:
        return len(self._image_ids)

    def keys(self) -> list[str]:
        """Every masked key, in file order."""
        return list(self._index)

    def image_id(self, key: object) -> str:
        """The archive key of the unmasked image of `key`."""
        return self._image_ids[self._position(key)]

    def boxes(self, key: object) -> np.ndarray:
        """int32 (n, 4) pixel boxes of `key`."""
        k = self._position(key)
        return self._boxes[self._offsets[k] : self._offsets[k + 1]]

    def _position(self, key: object) -> int:
        try:
            return self._index[str(key)]
        except KeyError:
            raise InputError(f"{self.path}: no mask boxes for key {str(key)!r}") from None
