"""The dataset registry: one entry per dataset that scripts/prepare_data.py reads from its raw downloads.

An entry says where the dataset's raw files are below RAW and how its ids work; every reader of raw
data (the split file, the image folders, Visual Genome's held-out images, the gold entities) takes
them from here (and scripts/disk_usage.py its published split sizes), so a new dataset in Karpathy's
split-file format is one `Dataset` in REGISTRY. Its name also goes into agree.layout.DATASETS, the
names that fine-tuning and evaluation accept (the layer below cannot import this one);
tests/test_datasets.py checks that the two agree.

Ids: a training image's id in the annotation files is the split file's `id_key` value; a val/test
image's id is that value too, or the file stem as a number (`heldout_id = "stem"`: the release's
Flickr30k test ids). Visual Genome's image_data.json names, under `vg_key`, the id in this dataset
of the same photo: VG images whose `vg_key` equals one of our val/test ids are left out of VG/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from agree.io import InputError

HELDOUT_IDS = ("stem", "id")


@dataclass(frozen=True)
class GoldEntities:
    """Flickr30k Entities-style gold phrases and boxes: <folder>/Sentences/, <folder>/Annotations/."""

    folder: str

    def sentences_dir(self, raw: Path) -> Path:
        """Folder of the marked-up captions."""
        return Path(raw) / self.folder / "Sentences"

    def annotations_dir(self, raw: Path) -> Path:
        """Folder of the boxes."""
        return Path(raw) / self.folder / "Annotations"


@dataclass(frozen=True)
class Dataset:
    """One dataset's raw files below RAW and its id scheme (see the module doc)."""

    name: str
    split_file: str  # Karpathy's split file
    image_folders: tuple[str, ...]  # every one must exist
    id_key: str  # split-file key of an image's id (also what duplicates are found by)
    folder_key: Optional[str] = (
        None  # split-file key naming an image's folder; None: image_folders[0]
    )
    heldout_id: str = (
        "id"  # val/test ids: "id" (the id_key value) or "stem" (the file stem as a number)
    )
    vg_key: Optional[str] = None  # image_data.json key holding this dataset's id of the photo
    gold_entities: Optional[GoldEntities] = None
    # published sizes, for the disk table of scripts/disk_usage.py (None: not in the table):
    # Karpathy's train (restval included), val and test images
    split_sizes: Optional[tuple[int, int, int]] = None
    example_stem: Optional[str] = None  # a training image's file stem (the length of its keys)

    def split_path(self, raw: Path) -> Path:
        """RAW/<split file>."""
        return Path(raw) / self.split_file


REGISTRY: dict[str, Dataset] = {
    "flickr30k": Dataset(
        name="flickr30k",
        split_file="dataset_flickr30k.json",
        image_folders=("flickr30k-images",),
        id_key="imgid",
        heldout_id="stem",
        vg_key="flickr_id",
        gold_entities=GoldEntities("flickr30k_entities"),
        split_sizes=(29_000, 1_014, 1_000),
        example_stem="1000092795",
    ),
    "coco": Dataset(
        name="coco",
        split_file="dataset_coco.json",
        image_folders=("train2014", "val2014"),
        id_key="cocoid",
        folder_key="filepath",
        heldout_id="id",
        vg_key="coco_id",
        split_sizes=(113_287, 5_000, 5_000),
        example_stem="COCO_train2014_000000391895",
    ),
}


def names() -> tuple[str, ...]:
    """The registered datasets, in registry order."""
    return tuple(REGISTRY)


def get_dataset(name: str, flag: str = "--dataset") -> Dataset:
    """The registry entry of `name`; an unknown name is an InputError naming `flag` and the choices."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise InputError(f"{flag}: unknown dataset {name!r} (choose from {', '.join(REGISTRY)})")
    return spec


def check_raw(spec: Dataset, raw: str | os.PathLike, flag: str = "--raw") -> None:
    """RAW holds the dataset's split file and every image folder; else an InputError naming what is missing."""
    raw = Path(raw)
    if not raw.is_dir():
        raise InputError(f"{flag}: folder not found: {raw}")
    if not spec.split_path(raw).is_file():
        raise InputError(f"{flag}: Karpathy's split file not found: {spec.split_path(raw)}")
    for folder in spec.image_folders:
        if not (raw / folder).is_dir():
            raise InputError(f"{flag}: image folder not found: {raw / folder}")


def sentences_dir(spec: Dataset, raw: str | os.PathLike, use_gold: bool = True) -> Optional[Path]:
    """The folder of gold phrases that textual entities come from first, or None (the dataset has no gold
    source, `use_gold` is off, or it is not downloaded): prepare_data.py's choice, shared by every user."""
    if spec.gold_entities is None or not use_gold:
        return None
    folder = spec.gold_entities.sentences_dir(Path(raw))
    return folder if folder.is_dir() else None


def annotations_dir(spec: Dataset, raw: str | os.PathLike, use_gold: bool = True) -> Optional[Path]:
    """The folder of gold boxes, or None (as sentences_dir)."""
    if spec.gold_entities is None or not use_gold:
        return None
    folder = spec.gold_entities.annotations_dir(Path(raw))
    return folder if folder.is_dir() else None
