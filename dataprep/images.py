"""Images: decode a file (any format PIL reads, EXIF orientation applied) and bring it to R x R exactly as
clip's eval transform does (Resize(R, bicubic) + CenterCrop(R) + RGB); the pixels a box covers there.

Imported by worker processes: nothing here imports torch. Workers return uint8 images (4x less to
send); the main process stores them as they are or as float32 (`Storage`): agree.pixels.normalise,
the same operations as clip.transform.array_to_tensor (ToTensor's /255, then (x - mean) / std). The
tests check that both give the same bits, so a float archive holds exactly what evaluation computes
from the uint8 one. Masks are filled by agree.masks.fill_boxes, the function fine-tuning uses too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from agree.masks import FILL_RGB, PixelBox, fill_boxes, pixel_box
from agree.pixels import CLIP_MEAN, CLIP_STD, normalise
from dataprep.geometry import Box, Geometry

EXIF_ORIENTATION = 274
STORAGE = ("uint8", "float32")
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageReadError(Exception):
    """An image file that cannot be used (missing, not an image, truncated, unsupported)."""


@dataclass
class Decoded:
    """A decoded image in its displayed orientation, and what was odd about the file."""

    image: Image.Image
    stored_size: tuple[int, int]  # (width, height) of the pixels as stored, before EXIF orientation
    orientation: int  # EXIF orientation tag (1 = none)
    format: str  # what the content is ("JPEG", "PNG", ...), whatever the file name says
    mode: str  # PIL mode of the file ("RGB", "L", "CMYK", "P", ...)


def decode(path: str | os.PathLike) -> Decoded:
    """Read an image file; ImageReadError names the file and what is wrong."""
    try:
        with Image.open(path) as im:
            im.load()
            fmt, mode, stored = im.format or "?", im.mode, im.size
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            image = ImageOps.exif_transpose(im) if orientation in range(2, 9) else im.copy()
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file (corrupt or unknown format)") from None
    except _READ_ERRORS as e:
        raise ImageReadError(f"{path}: cannot decode the image ({e})") from None
    if image.width < 1 or image.height < 1:
        raise ImageReadError(f"{path}: empty image")
    return Decoded(image, stored, orientation if orientation in range(2, 9) else 1, fmt, mode)


def to_model_input(image: Image.Image, resolution: int) -> np.ndarray:
    """uint8 (R, R, 3): clip's eval transform up to ToTensor (resize the short side to R, centre crop, RGB)."""
    g = Geometry(image.width, image.height, resolution)
    size = g.resized
    try:
        out = image if size == image.size else image.resize(size, Image.BICUBIC)
        left, top = g.offset
        out = out.crop((left, top, left + resolution, top + resolution)).convert("RGB")
    except _READ_ERRORS as e:
        raise ImageReadError(f"cannot convert a {image.mode} image to RGB ({e})") from None
    return np.asarray(out, dtype=np.uint8).copy()


def mask_pixels(boxes: Iterable[Box], resolution: int) -> list[PixelBox]:
    """The pixel boxes (agree.masks) of crop-space boxes: every pixel of the R x R image each one touches."""
    return [p for p in (pixel_box(b, resolution, resolution) for b in boxes) if p is not None]


def masked(array: np.ndarray, boxes: Iterable[Box]) -> np.ndarray:
    """Copy of a uint8 (R, R, 3) image with every pixel that a (crop-space) box touches set to CLIP's mean colour."""
    return fill_boxes(array, mask_pixels(boxes, array.shape[0]))


@dataclass(frozen=True)
class Storage:
    """How the archives store an image: `kind` uint8 (R, R, 3) RGB, or float32 (3, R, R) CLIP-normalised."""

    kind: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_clip(cls, kind: str) -> "Storage":
        """With CLIP's MEAN and STD."""
        if kind not in STORAGE:
            raise ValueError(f"unknown image storage {kind!r}")
        return cls(kind, CLIP_MEAN, CLIP_STD)

    @property
    def fill(self) -> tuple[int, int, int]:
        """CLIP's mean colour in 0-255, used for masked regions (agree.masks.FILL_RGB)."""
        return FILL_RGB

    def encode(self, array: np.ndarray) -> np.ndarray:
        """The stored form of a uint8 (R, R, 3) image."""
        if self.kind == "uint8":
            return array
        return normalise(array, self.mean, self.std)
