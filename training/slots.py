"""The batch slots of an AGREE example, declared once: each slot's kind, the inputs it reads, how it is built
for one example and what it holds when its input has nothing for that example.

A loss term names the slots it reads (training.terms); fine-tuning builds exactly the slots of the
enabled terms (training.dataset), needs exactly the files of their inputs (training.data) and collates
what the builders return. A term that needs a new slot adds entries here (a DataFile per new file, an
Input, a Slot with its builder; the input's loader in training.dataset), not branches elsewhere.

Per-example randomness (augmentation, Visual Genome choice, masked square) comes from a generator
seeded by (seed, epoch, index), so an example is the same whatever the number of workers or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np
import torch

from agree.entities import TRAIN_SLOTS, EntitySlots, prompt, training_slots
from agree.images import ImageArchive, read_normalised
from agree.layout import Layout, vg_masked_key
from training.augment import to_batch_tensor

if TYPE_CHECKING:  # the dataset holds the opened inputs (training.dataset imports this module)
    from training.dataset import AgreeDataset

IMAGE, TEXT = "image", "text"
SQUARE = 32  # side of the masked square of the image fallbacks
OBJECT_SPLITS = ("train", "test", "val")  # the release reads every split's objects, in this order


# --------------------------------------------------------------------------- files and inputs
@dataclass(frozen=True)
class DataFile:
    """One training input file: its flag (argparse dest = DataPaths field), what it holds, its layout default."""

    dest: str
    flag: str
    what: str
    default: Optional[Callable[[Layout], Union[Path, tuple]]]  # None: the flag is required
    item: str = ""  # what one key of the file is called in messages ("grounding image")
    masks: Optional[str] = None  # mask files: "boxes" (agree.masks) or "images" (masked copies)

    @property
    def many(self) -> bool:
        """The flag takes several files (read in order)."""
        return self.dest == "train_objects"


DATA_FILES: tuple[DataFile, ...] = (
    DataFile("train_data", "--train-data", "training captions", None),
    DataFile("train_images", "--train-images", "train image archive", lambda lay: lay.train_npz),
    DataFile(
        "train_objects",
        "--train-objects",
        "objects per image",
        lambda lay: tuple(lay.objects(s) for s in OBJECT_SPLITS),
    ),
    DataFile("vg_vocab", "--vg-vocab", "Visual Genome vocabulary", lambda lay: lay.vg_vocab),
    DataFile(
        "vg_images",
        "--vg-images",
        "Visual Genome images",
        lambda lay: lay.vg_images,
        "Visual Genome image",
    ),
    DataFile(
        "vg_mask_boxes",
        "--vg-mask-boxes",
        "Visual Genome mask boxes",
        lambda lay: lay.vg_mask_boxes,
        "Visual Genome mask",
        "boxes",
    ),
    DataFile(
        "vg_mask_images",
        "--vg-mask-images",
        "Visual Genome masked images",
        lambda lay: lay.vg_masked,
        "Visual Genome masked image",
        "images",
    ),
    DataFile(
        "grounding_boxes",
        "--grounding-boxes",
        "visual grounding mask boxes",
        lambda lay: lay.grounding_boxes,
        "grounding mask",
        "boxes",
    ),
    DataFile(
        "grounding_images",
        "--grounding-images",
        "visual grounding images",
        lambda lay: lay.grounding,
        "grounding image",
        "images",
    ),
)
FILES: dict[str, DataFile] = {f.dest: f for f in DATA_FILES}


@dataclass(frozen=True)
class Input:
    """What slots read: `files`, all needed; or (`choice`) one of interchangeable files, the first that the
    flags name, else the first the layout holds (mask boxes before masked copies)."""

    name: str
    what: str
    opens: tuple[str, ...]  # what its loader fills in training.dataset.TrainInputs
    files: tuple[str, ...] = ()
    choice: tuple[str, ...] = ()
    flag: Optional[str] = (
        None  # the flag errors name; None: the first enabled term's flag that needs it
    )

    @property
    def dests(self) -> tuple[str, ...]:
        """Every file this input may read."""
        return self.files + self.choice


INPUTS: tuple[Input, ...] = (  # loaded in this order (training.dataset.LOADERS)
    Input(
        "train",
        "training captions and images",
        ("records", "images"),
        files=("train_data", "train_images"),
        flag="--train-data",
    ),
    Input(
        "grounding_masks",
        "visual grounding masks",
        ("grounding",),
        choice=("grounding_boxes", "grounding_images"),
    ),
    Input(
        "vg_pairs",
        "Visual Genome object images",
        ("objects", "vg_vocab", "vg_images"),
        files=("train_objects", "vg_vocab", "vg_images"),
    ),
    Input(
        "vg_masks",
        "Visual Genome masks",
        ("vg_masked",),
        choice=("vg_mask_boxes", "vg_mask_images"),
    ),
)
BY_INPUT: dict[str, Input] = {i.name: i for i in INPUTS}


# --------------------------------------------------------------------------- one example
def zero_square(x: np.ndarray, rng: np.random.Generator, size: int = SQUARE) -> np.ndarray:
    """Copy of a normalised (3, H, W) image with a random size x size square (clipped at the border) set to
    0, i.e. exactly CLIP's mean colour, the same value whatever the storage."""
    out = np.array(x, copy=True)
    h, w = out.shape[1], out.shape[2]
    y, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
    out[:, y : y + size, x0 : x0 + size] = 0.0
    return out


def pick_vg_object(
    objects: Sequence[str], vocab: dict[str, list[str]], rng: np.random.Generator
) -> Optional[tuple[str, str]]:
    """Shuffle the image's objects; for the first with a usable VG image return (object, VG image id)."""
    for k in rng.permutation(len(objects)):
        candidates = vocab.get(objects[k])
        if candidates:
            return objects[k], candidates[int(rng.integers(0, len(candidates)))]
    return None


class Example:
    """One example being built: its record, its random streams, and what its slots share (the images read,
    normalised once; the Visual Genome pick; the entity slots; the slots already built)."""

    def __init__(self, data: "AgreeDataset", index: int):
        self.data = data
        self.record = data.records[index]
        self.rng = np.random.default_rng((data.seed, data.epoch, index))
        self.seeds = self.rng.integers(0, 2**62, size=len(IMAGE_SLOTS))
        self._read: dict[tuple[int, str], np.ndarray] = {}
        self._built: dict[str, object] = {}

    def read(self, archive: ImageArchive, key: str) -> np.ndarray:
        """Image `key` of `archive`, CLIP-normalised float32 (3, R, R); each image is read once per example."""
        k = (id(archive), str(key))
        if k not in self._read:
            self._read[k] = read_normalised(archive, str(key))
        return self._read[k]

    def slot(self, name: str):
        """The value of slot `name` (built once)."""
        if name not in self._built:
            self._built[name] = SLOTS[name].build(self)
        return self._built[name]

    def tensor(self, slot: str, x: np.ndarray) -> torch.Tensor:
        """A normalised array as image slot `slot` holds it (augmented with the slot's own seed)."""
        seed = int(self.seeds[IMAGE_SLOTS.index(slot)])
        return to_batch_tensor(x, self.data.resolution, self.data.augment, seed)

    @cached_property
    def image(self) -> np.ndarray:
        """The example's own image, normalised."""
        return self.read(self.data.images, self.record.image_key)

    @cached_property
    def entities(self) -> EntitySlots:
        """Prompts and masked captions of the caption's first short segs."""
        return training_slots(self.record.caption, self.record.segs)

    @cached_property
    def vg_pick(self) -> Optional[tuple[str, str]]:
        """(object word, VG image id) of the image's Visual Genome pair, or None (no usable object)."""
        objects = self.data.objects.get(self.record.stem, [])
        return pick_vg_object(objects, self.data.vg_vocab, self.rng)


# --------------------------------------------------------------------------- the slots
def _image(ex: Example) -> torch.Tensor:
    return ex.tensor("image", ex.image)


def _vg_image(ex: Example) -> torch.Tensor:
    if ex.vg_pick is None:  # the example itself stands in (with its masked-square copy below)
        return ex.slot("image")
    return ex.tensor("vg_image", ex.read(ex.data.vg_images, ex.vg_pick[1]))


def _vg_image_masked(ex: Example) -> torch.Tensor:
    if ex.vg_pick is None:
        return ex.tensor("vg_image_masked", zero_square(ex.image, ex.rng))
    key = vg_masked_key(*ex.vg_pick)
    return ex.tensor("vg_image_masked", ex.data.vg_masked.normalised(key, ex.read))


def _grounding_masked(ex: Example) -> torch.Tensor:
    key = ex.record.grounding_key
    if key is None or key not in ex.data.grounding:  # no grounded label (or an allowed miss)
        return ex.tensor("grounding_masked", zero_square(ex.image, ex.rng))
    return ex.tensor("grounding_masked", ex.data.grounding.normalised(key, ex.read))


def _vg_text(ex: Example) -> list[str]:
    return [ex.record.caption if ex.vg_pick is None else prompt(ex.vg_pick[0])]


@dataclass(frozen=True)
class Slot:
    """One entry of a batch: images [B, 3, R, R], or token ids [B, L] (rows 1) / [B, rows, L]."""

    name: str
    kind: str  # IMAGE or TEXT
    inputs: tuple[str, ...]  # Input names (INPUTS) it reads
    build: Callable[[Example], Union[torch.Tensor, list[str]]]  # an image tensor, or `rows` texts
    fallback: str  # what it holds when its input has nothing for the example
    rows: int = 1
    needs: tuple[
        str, ...
    ] = ()  # keys its builder reads from each training record ("segs", "preds")
    # how many examples take the fallback is reported at start-up for the slots that give a rule
    falls_back: Optional[Callable[["AgreeDataset", object], bool]] = None
    falls_back_note: str = ""


SLOT_LIST: tuple[Slot, ...] = (
    Slot("image", IMAGE, ("train",), _image, "none: a missing train image is an error"),
    Slot(
        "vg_image",
        IMAGE,
        ("train", "vg_pairs"),
        _vg_image,
        "the example's own image, when none of its objects has a usable Visual Genome image",
        falls_back=lambda data, r: (
            not any(data.vg_vocab.get(o) for o in data.objects.get(r.stem, []))
        ),
        falls_back_note="captions' images list no object with a usable VG entry (they take the "
        "substitute pair: the example itself and a masked-square copy)",
    ),
    Slot(
        "vg_image_masked",
        IMAGE,
        ("train", "vg_pairs", "vg_masks"),
        _vg_image_masked,
        "the example's image with a random 32 x 32 square of CLIP's mean colour",
    ),
    Slot(
        "grounding_masked",
        IMAGE,
        ("train", "grounding_masks"),
        _grounding_masked,
        "the example's image with a random 32 x 32 square of CLIP's mean colour",
        needs=("preds",),
        falls_back=lambda data, r: r.grounding_key is None,
        falls_back_note="captions have no grounded label (they take the masked-square substitute)",
    ),
    Slot("text", TEXT, ("train",), lambda ex: [ex.record.caption], "none"),
    Slot(
        "prompts",
        TEXT,
        ("train",),
        lambda ex: ex.entities.prompts,
        'the empty text "" for each unused entity slot',
        rows=TRAIN_SLOTS,
        needs=("segs",),
    ),
    Slot(
        "masked",
        TEXT,
        ("train",),
        lambda ex: ex.entities.masked,
        'the empty text "" for each unused entity slot',
        rows=TRAIN_SLOTS,
        needs=("segs",),
    ),
    Slot(
        "vg_text",
        TEXT,
        ("train", "vg_pairs"),
        _vg_text,
        "the caption, when vg_image is the example's own image",
    ),
)
SLOTS: dict[str, Slot] = {s.name: s for s in SLOT_LIST}
# What a batch can hold: images [B, 3, R, R] and token ids [B, L] or [B, S, L] (entity slots).
IMAGE_SLOTS: tuple[str, ...] = tuple(s.name for s in SLOT_LIST if s.kind == IMAGE)
TEXT_SLOTS: tuple[str, ...] = tuple(s.name for s in SLOT_LIST if s.kind == TEXT)


def inputs_of(slots: Sequence[str]) -> list[Input]:
    """The inputs the named slots read, in loading order."""
    names = {i for s in slots for i in SLOTS[s].inputs}
    return [i for i in INPUTS if i.name in names]


def ordered(slots: Sequence[str]) -> list[str]:
    """The named slots in registry order (the order their builders run, so random draws are reproducible)."""
    return [s.name for s in SLOT_LIST if s.name in set(slots)]
