"""Pixels as the archives store them: uint8 (R, R, 3) RGB, or float32 (3, R, R) normalised with CLIP's mean
and std, and the one normalisation that maps the first onto the second.

Imported by dataprep's worker processes: nothing here imports torch. The constants are
clip.transform's MEAN and STD, copied so that preparing data does not import torch (2 s and ~600 MB);
a test pins them to clip.transform. The normalisation is ToTensor's /255, then (x - mean) / std, each
step in float32: bit for bit what clip.transform.array_to_tensor computes (tested for every byte value).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # = clip.transform.MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # = clip.transform.STD


def is_rgb_uint8(array: np.ndarray) -> bool:
    """A raw (H, W, 3) uint8 RGB array."""
    return array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8


def is_normalised(array: np.ndarray) -> bool:
    """A CLIP-normalised float (3, H, W) array."""
    return array.ndim == 3 and array.shape[0] == 3 and np.issubdtype(array.dtype, np.floating)


def unsupported(array: np.ndarray) -> ValueError:
    """The error for an array that is neither stored form."""
    return ValueError(
        f"unsupported image array: shape {tuple(array.shape)}, dtype {array.dtype} "
        "(expected float (3, R, R) preprocessed or uint8 (R, R, 3) RGB)"
    )


def normalise(
    array: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, H, W): x / 255, then (x - mean) / std, each step in float32.

    Computed once per byte value and channel (a 256 x 3 table), then looked up: the same bits as
    the arithmetic on every pixel, several times faster."""
    table = _table(tuple(mean), tuple(std))
    channels = np.moveaxis(array, -1, 0)
    out = np.empty(channels.shape, np.float32)
    for c in range(3):
        np.take(table[c], channels[c], out=out[c])
    return out


def normalised(array: np.ndarray) -> np.ndarray:
    """A stored image in CLIP-normalised float32 (3, H, W): uint8 through `normalise`, float as is (no copy
    when it is float32 already)."""
    if is_rgb_uint8(array):
        return normalise(array)
    if is_normalised(array):
        return np.asarray(array, dtype=np.float32)
    raise unsupported(array)


def normalised_value(rgb: Sequence[int]) -> np.ndarray:
    """float32 (3,): what `normalise` maps one uint8 colour to."""
    table = _table(CLIP_MEAN, CLIP_STD)
    return np.array([table[c][int(rgb[c])] for c in range(3)], dtype=np.float32)


def normalised_range() -> tuple[np.ndarray, np.ndarray]:
    """float32 (3,) low and high: the normalised values of bytes 0 and 255 (the displayable range)."""
    return normalised_value((0, 0, 0)), normalised_value((255, 255, 255))


_TABLES: dict = {}


def _table(mean: tuple, std: tuple) -> np.ndarray:
    key = (mean, std)
    if key not in _TABLES:
        x = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
        m = np.asarray(mean, np.float32)[:, None]
        s = np.asarray(std, np.float32)[:, None]
        _TABLES[key] = (x - m) / s
    return _TABLES[key]
