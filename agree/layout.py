"""File names of a dataset in the release's layout (docs/data.md, File formats), for any dataset name.

    <root>/datasets/<dataset>_images/annotation/<dataset>_train_pred.jsonl, ... (see Layout)
    <root>/VG/VG_images.224.npz, VG_mask_boxes.224.jsonl (or VG_mask_images.224.npz), vocab_VG_images_objs.jsonl

`root` is `tmp/` in the README's recipes. Every reader and writer of the layout takes its paths
from here, so another dataset (e.g. "coco") is one word away.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

DEFAULT_ROOT = Path("tmp")
DEFAULT_DATASET = "flickr30k"
DATASETS = ("flickr30k", "coco")  # = the names of dataprep.datasets.REGISTRY (a test checks it)
FILE_RESOLUTION = 224  # the size written into the npz file names of the release (".224.npz")
SPLITS = ("train", "val", "test")

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Layout:
    """Where each file of one dataset lives: `data_dir` = <root>/datasets/<dataset>_images, `vg_dir` = <root>/VG."""

    data_dir: Path
    vg_dir: Path
    dataset: str = DEFAULT_DATASET
    resolution: int = FILE_RESOLUTION

    @classmethod
    def under(
        cls,
        root: PathLike = DEFAULT_ROOT,
        dataset: str = DEFAULT_DATASET,
        resolution: int = FILE_RESOLUTION,
    ) -> "Layout":
        """The layout below a root folder such as tmp/."""
        root = Path(root)
        return cls(root / "datasets" / f"{dataset}_images", root / "VG", dataset, resolution)

    @classmethod
    def from_data_dir(
        cls,
        data_dir: PathLike,
        dataset: str = DEFAULT_DATASET,
        vg_dir: Optional[PathLike] = None,
        resolution: int = FILE_RESOLUTION,
    ) -> "Layout":
        """The layout of a dataset folder; Visual Genome defaults to <data_dir>/../../VG."""
        data_dir = Path(data_dir)
        return cls(
            data_dir,
            Path(vg_dir) if vg_dir is not None else data_dir.parent.parent / "VG",
            dataset,
            resolution,
        )

    @property
    def root(self) -> Path:
        """The folder holding datasets/ and VG/ (tmp/ in the README)."""
        return self.data_dir.parent.parent

    @property
    def annotation(self) -> Path:
        """<data_dir>/annotation."""
        return self.data_dir / "annotation"

    def _ann(self, suffix: str) -> Path:
        return self.annotation / f"{self.dataset}_{suffix}"

    @property
    def train_jsonl(self) -> Path:
        """Training captions with segs and preds."""
        return self._ann("train_pred.jsonl")

    @property
    def train_npz(self) -> Path:
        """Train images, key = str(image_id)."""
        return self._ann("train_images.npz")

    @property
    def val_json(self) -> Path:
        """Validation captions: a JSON list of {image, caption: [5 captions]}."""
        return self._ann("val.json")

    @property
    def val_npz(self) -> Path:
        """Val images, key = str(index in val_json)."""
        return self._ann("val_images.npz")

    @property
    def test_npz(self) -> Path:
        """Test images, key = image id."""
        return self._ann("test_images.npz")

    @property
    def test_texts(self) -> Path:
        """T2I ground truth: {query_id, query_text, item_ids}."""
        return self._ann("test_texts.jsonl")

    @property
    def test_images(self) -> Path:
        """I2T ground truth: {image_id, item_ids}."""
        return self._ann("test_images.jsonl")

    @property
    def test_segs(self) -> Path:
        """Textual entities of each test caption: {query_id, query_text, items}."""
        return self._ann("test_texts_segs.jsonl")

    def objects(self, split: str) -> Path:
        """Objects seen in each image of a split: {image_id (file stem), image_objects}."""
        return self.data_dir / "objects" / f"{self.dataset}_{split}_imgs_objs.jsonl"

    @property
    def grounding(self) -> Path:
        """Train images with one grounded entity masked, key = "{stem}_{label}"."""
        return self.data_dir / f"{self.dataset}_visual_grounding.{self.resolution}.npz"

    @property
    def grounding_boxes(self) -> Path:
        """The boxes to mask in each train image instead of `grounding` (agree.masks), one line per "{stem}_{label}"."""
        return self.data_dir / f"{self.dataset}_visual_grounding.{self.resolution}.boxes.jsonl"

    @property
    def vg_images(self) -> Path:
        """Visual Genome images, key = VG image id."""
        return self.vg_dir / f"VG_images.{self.resolution}.npz"

    @property
    def vg_masked(self) -> Path:
        """Visual Genome images with one object masked, key = "{object}_{vg image id}"."""
        return self.vg_dir / f"VG_mask_images.{self.resolution}.npz"

    @property
    def vg_mask_boxes(self) -> Path:
        """The box to mask in each VG image instead of `vg_masked` (agree.masks), a line per "{object}_{vg id}"."""
        return self.vg_dir / f"VG_mask_boxes.{self.resolution}.jsonl"

    @property
    def vg_vocab(self) -> Path:
        """Object word -> VG images containing it."""
        return self.vg_dir / "vocab_VG_images_objs.jsonl"

    def test_files(self) -> tuple[Path, ...]:
        """What the evaluation recipes read."""
        return (self.test_npz, self.test_texts, self.test_images, self.test_segs)


# ---------------------------------------------------------------------------- id schemes
CAPTIONS_PER_IMAGE = 5  # val and test images keep their first 5 captions


def val_image_key(index: int) -> str:
    """npz key of the validation image at position `index` of <dataset>_val.json."""
    return str(index)


def caption_query_id(image_index: int, caption_index: int) -> int:
    """Query id of caption j of the k-th test (or validation) image: 5k + j."""
    if not 0 <= caption_index < CAPTIONS_PER_IMAGE:
        raise ValueError(f"caption index {caption_index} outside 0..{CAPTIONS_PER_IMAGE - 1}")
    return CAPTIONS_PER_IMAGE * image_index + caption_index


def grounding_key(stem: str, label: str) -> str:
    """Key of a grounding-masked image: "{file stem}_{label}"."""
    return f"{stem}_{label}"


def vg_masked_key(word: str, vg_image_id: object) -> str:
    """Key of a masked Visual Genome image: "{object word}_{VG image id}"."""
    return f"{word}_{vg_image_id}"


def dataset_of(train_file: PathLike, default: str = DEFAULT_DATASET) -> str:
    """The dataset a "<dataset>_train_pred.jsonl" file belongs to (`default` for any other name)."""
    m = re.fullmatch(r"(.+)_train_pred\.jsonl", Path(train_file).name)
    return m.group(1) if m and m.group(1) in DATASETS else default
