"""Visual Genome: image_data.json (sizes, coco_id / flickr_id), objects.json (named boxes), and the choice of
the images written to VG/ for each vocabulary word.

Vocabulary words are VG object names in lower case (letters, spaces, `'` and `-`; at most 3 words).
For each word, an image qualifies when its largest box of that word, taken through the same resize
and centre crop as the image, passes the crop rule of dataprep.geometry and covers between
MIN_AREA and MAX_AREA of the crop. Of the qualifying images, the `per_word` with the smallest
CRC-32 of "word|image id" are kept (a fixed pseudo-random sample: same inputs, same choice).
Images that are val/test images of the dataset being prepared (by the key of image_data.json that its
registry entry names: flickr_id, coco_id) are excluded, so fine-tuning never sees a test image.
"""

from __future__ import annotations

import heapq
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from agree.io import InputError
from dataprep.geometry import Box, Geometry, from_xywh
from dataprep.jsonstream import iter_array

FOLDERS = ("VG_100K", "VG_100K_2")
MIN_AREA, MAX_AREA = 0.02, 0.8
MAX_WORDS = 3
_WORD = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")


@dataclass(frozen=True)
class VgImage:
    """One entry of image_data.json."""

    image_id: int
    width: int
    height: int
    folder: Optional[str]  # VG_100K or VG_100K_2 when the url says so
    other_ids: dict[str, int]  # the photo's id in other datasets, by key ("coco_id", "flickr_id")


@dataclass(frozen=True)
class Candidate:
    """A (word, image) pair: the box to mask (original pixels) and the object's name as annotated."""

    image_id: int
    box: Box
    name: str


def _int_or_none(v: object) -> Optional[int]:
    if v is None or isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def read_image_data(path: str | os.PathLike) -> dict[int, VgImage]:
    """VG image id -> its entry ('image_id' or 'id', width, height, url, and every other integer '*_id')."""
    out: dict[int, VgImage] = {}
    for k, rec in enumerate(iter_array(path)):
        where = f"{path}: entry {k}"
        if not isinstance(rec, dict):
            raise InputError(f"{where}: not an object")
        image_id = _int_or_none(rec.get("image_id", rec.get("id")))
        width, height = _int_or_none(rec.get("width")), _int_or_none(rec.get("height"))
        if image_id is None or not width or not height or width < 1 or height < 1:
            raise InputError(
                f"{where}: needs an integer 'image_id' (or 'id'), 'width' and 'height'"
            )
        url = rec.get("url") or ""
        folder = next((f for f in FOLDERS if f"/{f}/" in url), None)
        if image_id in out:
            raise InputError(f"{where}: duplicate image id {image_id}")
        other = {
            k: _int_or_none(v) for k, v in rec.items() if k.endswith("_id") and k != "image_id"
        }
        out[image_id] = VgImage(
            image_id, width, height, folder, {k: v for k, v in other.items() if v is not None}
        )
    return out


def heldout_images(
    images: dict[int, VgImage], key: Optional[str], heldout_ids: set[str]
) -> set[int]:
    """VG ids of images whose `key` (e.g. flickr_id) is one of `heldout_ids`; none when `key` is None."""
    if key is None:
        return set()
    return {
        g
        for g, im in images.items()
        if key in im.other_ids and str(im.other_ids[key]) in heldout_ids
    }


def vocab_word(name: object) -> Optional[str]:
    """A VG object name as a vocabulary word, or None when it is not one (digits, symbols, > 3 words)."""
    if not isinstance(name, str):
        return None
    word = " ".join(name.lower().split())
    if not _WORD.fullmatch(word) or len(word.split()) > MAX_WORDS:
        return None
    return word


def _names(obj: dict) -> list[str]:
    names = obj.get("names")
    if isinstance(names, list):
        return [n for n in names if isinstance(n, str)]
    name = obj.get("name")
    return [name] if isinstance(name, str) else []


def choice_key(word: str, image_id: int) -> int:
    """The fixed pseudo-random order of a word's images."""
    return zlib.crc32(f"{word}|{image_id}".encode())


def qualifying_box(geometry: Geometry, box: Box) -> bool:
    """Whether masking this box makes a usable VG mask pair (crop rule, then MIN_AREA..MAX_AREA of the crop)."""
    c = geometry.crop_box(box)
    if c is None:
        return False
    area = (c[2] - c[0]) * (c[3] - c[1]) / float(geometry.resolution**2)
    return MIN_AREA <= area <= MAX_AREA


def select_candidates(
    objects_path: str | os.PathLike,
    images: dict[int, VgImage],
    excluded: set[int],
    resolution: int,
    per_word: int,
    progress: Iterable = None,
) -> tuple[dict[str, list[Candidate]], dict]:
    """Stream objects.json; return (word -> its chosen candidates in choice order, counts)."""
    heaps: dict[str, list] = {}
    counts = {"vg_images_in_objects": 0, "vg_images_without_image_data": 0}
    for k, rec in enumerate(iter_array(objects_path)):
        if progress is not None:
            progress.update(1)
        if not isinstance(rec, dict):
            raise InputError(f"{objects_path}: entry {k}: not an object")
        image_id = _int_or_none(rec.get("image_id", rec.get("id")))
        objs = rec.get("objects")
        if image_id is None or not isinstance(objs, list):
            raise InputError(f"{objects_path}: entry {k}: needs 'image_id' and an 'objects' list")
        counts["vg_images_in_objects"] += 1
        if image_id in excluded:
            continue
        im = images.get(image_id)
        if im is None:
            counts["vg_images_without_image_data"] += 1
            continue
        g = Geometry(im.width, im.height, resolution)
        best: dict[str, tuple[float, Box, str]] = {}
        for obj in objs:
            if not isinstance(obj, dict):
                continue
            try:
                box = from_xywh(*(float(obj[c]) for c in ("x", "y", "w", "h")))
            except (KeyError, TypeError, ValueError):
                continue
            if not qualifying_box(g, box):
                continue
            area = (box[2] - box[0]) * (box[3] - box[1])
            for name in _names(obj):
                word = vocab_word(name)
                if word is not None and (word not in best or area > best[word][0]):
                    best[word] = (area, box, name.strip())
        for word, (_, box, name) in best.items():
            heap = heaps.setdefault(word, [])
            item = (-choice_key(word, image_id), -image_id, box, name)
            if len(heap) < per_word:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    chosen = {
        w: [Candidate(-i, box, name) for _, i, box, name in sorted(h, reverse=True)]
        for w, h in sorted(heaps.items())
    }
    return chosen, counts


def image_path(vg_raw: Path, image: VgImage) -> list[Path]:
    """Where the image file may be: the folder its url names first, then the other."""
    folders = [image.folder] if image.folder else []
    folders += [f for f in FOLDERS if f not in folders]
    return [vg_raw / f / f"{image.image_id}.jpg" for f in folders]
