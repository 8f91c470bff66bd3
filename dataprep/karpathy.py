"""Karpathy's split files (dataset_flickr30k.json, dataset_coco.json): images, splits and raw captions.

`images[]` entries: {filename, imgid, split, sentences[].raw, ...}, COCO adds {filepath, cocoid}. The
COCO `restval` split trains. Captions are the `raw` texts with whitespace collapsed; val and test keep
the first CAPTIONS_PER_TEST (5) of an image (some COCO images have 6 or 7), train keeps all.
Which key holds an image's id and folder, and how val/test images are identified, is the dataset's
registry entry (dataprep.datasets): COCO -> `cocoid` for every split; Flickr30k -> Karpathy's `imgid`
for train (as in the release's files) and the file stem as a number for val/test (the release's test ids).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from agree.io import InputError
from dataprep.datasets import Dataset
from dataprep.jsonstream import iter_array
from dataprep.skips import SkipLog

SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
CAPTIONS_PER_TEST = 5

ImageId = Union[int, str]


@dataclass(frozen=True)
class ImageEntry:
    """One image of the split file."""

    split: str  # train | val | test
    file: str  # path below RAW, also the `image` field of the annotation files
    stem: str  # file name without extension: the key of objects and grounding images
    image_id: ImageId  # id in the annotation files (npz key: its string form)
    captions: tuple[str, ...]
    index: int  # position in the split file, for messages
    # the registry's id_key value (Flickr30k imgid, COCO cocoid): duplicates are skipped
    source_id: int


def numeric(stem: str) -> ImageId:
    """A file stem as an int when it is one exactly ("1007129816" -> 1007129816), else the string."""
    return int(stem) if stem.isdigit() and str(int(stem)) == stem else stem


def _entry(spec: Dataset, rec: object, k: int, where: str, skips: SkipLog) -> ImageEntry:
    if not isinstance(rec, dict):
        raise InputError(f"{where}: images[{k}] is not an object")
    need = ["filename", "split", "sentences", spec.id_key] + (
        [spec.folder_key] if spec.folder_key else []
    )
    for key in need:
        if key not in rec:
            raise InputError(f"{where}: images[{k}]: missing key {key!r}")
    split = SPLIT_OF.get(rec["split"])
    if split is None:
        raise InputError(
            f"{where}: images[{k}]: unknown split {rec['split']!r} (expected train, restval, val or test)"
        )
    filename = rec["filename"]
    if not isinstance(filename, str) or not filename or "/" in filename:
        raise InputError(f"{where}: images[{k}]: bad filename {filename!r}")
    if not isinstance(rec["sentences"], list):
        raise InputError(f"{where}: images[{k}]: 'sentences' must be a list")
    captions = []
    for j, s in enumerate(rec["sentences"]):
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str):
            raise InputError(f"{where}: images[{k}].sentences[{j}]: missing 'raw' caption")
        text = " ".join(raw.split())
        if not text:
            skips.skip("captions", f"{where}: images[{k}] ({filename}) sentence {j}: empty caption")
            continue
        captions.append(text)
    if split != "train":
        captions = captions[:CAPTIONS_PER_TEST]
    stem = Path(filename).stem
    source_id = rec[spec.id_key]
    if not isinstance(source_id, int) or isinstance(source_id, bool):
        raise InputError(f"{where}: images[{k}]: {spec.id_key!r} must be an integer")
    folder = rec[spec.folder_key] if spec.folder_key else spec.image_folders[0]
    if not isinstance(folder, str) or not folder:
        raise InputError(f"{where}: images[{k}]: bad {spec.folder_key!r} {folder!r}")
    file = f"{folder}/{filename}"
    image_id = source_id if split == "train" or spec.heldout_id == "id" else numeric(stem)
    return ImageEntry(split, file, stem, image_id, tuple(captions), k, source_id)


def read_split_file(path: str | os.PathLike, spec: Dataset, skips: SkipLog) -> list[ImageEntry]:
    """All usable images of a Karpathy split file, in file order; duplicates and caption-less images are skipped."""
    where = str(path)
    entries: list[ImageEntry] = []
    seen: dict[tuple[str, str], int] = {}
    n = n_captions = 0
    for k, rec in enumerate(iter_array(path, "images")):
        n += 1
        n_captions += len(rec.get("sentences") or []) if isinstance(rec, dict) else 0
        e = _entry(spec, rec, k, where, skips)
        dup = next(
            (
                (what, seen[(what, v)])
                for what, v in (("file", e.file), ("id", str(e.source_id)))
                if (what, v) in seen
            ),
            None,
        )
        if dup is not None:
            skips.skip(
                "images", f"{where}: images[{k}] ({e.file}): duplicate {dup[0]} of images[{dup[1]}]"
            )
            continue
        if not e.captions:
            skips.skip("images", f"{where}: images[{k}] ({e.file}): no caption")
            continue
        seen[("file", e.file)] = seen[("id", str(e.source_id))] = k
        entries.append(e)
    if n == 0:
        raise InputError(f"{where}: the 'images' list is empty")
    skips.total("images", n)
    skips.total("captions", n_captions)
    return entries
