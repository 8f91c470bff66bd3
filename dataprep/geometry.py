"""Where a box of the original image lands in the stored R x R image (CLIP's eval Resize + CenterCrop).

Boxes are continuous pixel corners (x0, y0, x1, y1) with 0 at the image's top-left edge: a 0-based
pixel index i covers [i, i + 1). Flickr30k Entities' 1-based inclusive corners convert with
`from_one_based`.

The rule for boxes that the centre crop cuts (documented in the README): a box is clipped to the
crop; it is dropped when less than MIN_VISIBLE of its area lies inside the crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

Box = tuple[float, float, float, float]
MIN_VISIBLE = 0.25


@dataclass(frozen=True)
class Geometry:
    """Resize so the short side is R (long side int(R * long / short), as torchvision), then centre-crop R x R."""

    width: int
    height: int
    resolution: int

    @property
    def resized(self) -> tuple[int, int]:
        """(width, height) after the resize."""
        w, h, r = self.width, self.height, self.resolution
        if w <= h:
            return r, int(r * h / w)
        return int(r * w / h), r

    @property
    def offset(self) -> tuple[int, int]:
        """(left, top) of the crop in the resized image."""
        rw, rh = self.resized
        r = self.resolution
        return int(round((rw - r) / 2.0)), int(round((rh - r) / 2.0))

    def map_box(self, box: Box) -> Box:
        """The box in the coordinates of the R x R crop (not clipped)."""
        rw, rh = self.resized
        left, top = self.offset
        sx, sy = rw / self.width, rh / self.height
        x0, y0, x1, y1 = box
        return x0 * sx - left, y0 * sy - top, x1 * sx - left, y1 * sy - top

    def crop_box(self, box: Box) -> Optional[Box]:
        """The mapped box clipped to the crop, or None when less than MIN_VISIBLE of it is inside."""
        x0, y0, x1, y1 = self.map_box(box)
        area = (x1 - x0) * (y1 - y0)
        r = float(self.resolution)
        c = (max(x0, 0.0), max(y0, 0.0), min(x1, r), min(y1, r))
        inside = max(0.0, c[2] - c[0]) * max(0.0, c[3] - c[1])
        if area <= 0 or inside < MIN_VISIBLE * area:
            return None
        return c


def from_one_based(xmin: float, ymin: float, xmax: float, ymax: float) -> Box:
    """Flickr30k Entities / VOC corners (1-based, inclusive pixels) -> continuous 0-based corners."""
    return xmin - 1.0, ymin - 1.0, float(xmax), float(ymax)


def from_xywh(x: float, y: float, w: float, h: float) -> Box:
    """Visual Genome's (x, y, w, h) with 0-based pixels -> corners."""
    return float(x), float(y), float(x + w), float(y + h)


def clip_to_image(box: Box, width: int, height: int) -> Optional[Box]:
    """The box clipped to the image; None when nothing of it is inside (or it is degenerate)."""
    x0, y0, x1, y1 = box
    c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    if c[2] <= c[0] or c[3] <= c[1]:
        return None
    return c


def box_valid(box: Box) -> bool:
    """Four finite numbers with x1 > x0 and y1 > y0."""
    return (
        len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]
    )


def pixel_span(box: Box) -> tuple[int, int, int, int]:
    """Integer pixel ranges [x0, x1) x [y0, y1) covering every pixel the box touches."""
    x0, y0, x1, y1 = box
    return int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)), int(math.ceil(y1))


# EXIF orientation (tag 274) -> how the stored pixels map to the displayed image.
def exif_box(box: Box, orientation: int, width: int, height: int) -> Box:
    """A box given on the stored pixels (width x height) -> the same box on the EXIF-oriented image."""
    x0, y0, x1, y1 = box
    w, h = float(width), float(height)
    if orientation == 2:  # mirrored left-right
        return w - x1, y0, w - x0, y1
    if orientation == 3:  # rotated 180
        return w - x1, h - y1, w - x0, h - y0
    if orientation == 4:  # mirrored top-bottom
        return x0, h - y1, x1, h - y0
    if orientation == 5:  # transposed
        return y0, x0, y1, x1
    if orientation == 6:  # rotated 90 clockwise for display
        return h - y1, x0, h - y0, x1
    if orientation == 7:  # transversed
        return h - y1, w - x1, h - y0, w - x0
    if orientation == 8:  # rotated 90 counter-clockwise for display
        return y0, w - x1, y1, w - x0
    return box
