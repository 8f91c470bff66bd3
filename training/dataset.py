"""The AGREE training example as a torch Dataset (its slots are built as training.slots declares them), the
start-up pass that opens and checks the inputs the enabled terms need, and the resumable sharded loader.

Per-example randomness (augmentation, Visual Genome choice, masked square) is seeded by (seed, epoch,
index), so a batch is the same whatever the number of workers or ranks, and a resumed run sees the
same data as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from agree.images import BoxMasks, ImageArchive, MaskedArchive, MaskedImages
from agree.io import InputError
from agree.layout import vg_masked_key
from agree.masks import MaskBoxes
from training.augment import AUGMENTATIONS, NONE
from training.data import (
    DataPaths,
    Misses,
    TrainRecord,
    chosen_file,
    enforce_missing,
    input_flag,
    load_objects,
    load_train_records,
    load_vg_entries,
    required_files,
    vg_vocab,
)
from training.slots import (
    IMAGE,
    SLOTS,
    DataFile,
    Example,
    Input,
    inputs_of,
    ordered,
)
from training.terms import slots_of
from training.tokens import Tokenizer


class AgreeDataset(Dataset):
    """One AGREE example per caption: the slots the enabled terms read (image tensors, token ids)."""

    def __init__(
        self,
        records: list[TrainRecord],
        images: ImageArchive,
        resolution: int,
        terms: Sequence[str],
        seed: int = 0,
        grounding: Optional[MaskedImages] = None,
        objects: Optional[dict[str, list[str]]] = None,
        vg_vocab: Optional[dict[str, list[str]]] = None,
        vg_images: Optional[ImageArchive] = None,
        vg_masked: Optional[MaskedImages] = None,
        augment: str = NONE,
    ):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r} (choose from {AUGMENTATIONS})")
        self.records, self.images, self.resolution = records, images, resolution
        self.slots = ordered(slots_of(terms))
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.grounding, self.objects, self.vg_vocab = grounding, objects, vg_vocab
        self.vg_images, self.vg_masked = vg_images, vg_masked
        for inp in inputs_of(self.slots):
            for name in inp.opens:
                if getattr(self, name) is None:
                    raise ValueError(f"the slots {self.slots} need {inp.what} ({name})")
        self.objects, self.vg_vocab = objects or {}, vg_vocab or {}
        self.tokenizer = Tokenizer()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-example randomness __getitem__ uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ex = Example(self, index)
        out: dict[str, torch.Tensor] = {}
        texts: list[str] = []
        rows: list[tuple[str, int]] = []
        for name in self.slots:
            slot, value = SLOTS[name], ex.slot(name)
            if slot.kind == IMAGE:
                out[name] = value
                continue
            if len(value) != slot.rows:
                raise RuntimeError(f"slot {name!r} built {len(value)} texts, not {slot.rows}")
            texts += value
            rows.append((name, slot.rows))
        tokens = self.tokenizer(texts)
        k = 0
        for name, n in rows:
            out[name] = tokens[k] if n == 1 else tokens[k : k + n]
            k += n
        return out


@dataclass
class TrainInputs:
    """Everything the training examples are built from, read and checked before the run starts."""

    records: list[TrainRecord]
    images: Optional[ImageArchive]
    terms: tuple[str, ...]
    grounding: Optional[MaskedImages] = None
    objects: Optional[dict[str, list[str]]] = None
    vg_vocab: Optional[dict[str, list[str]]] = None
    vg_images: Optional[ImageArchive] = None
    vg_masked: Optional[MaskedImages] = None
    augment: str = NONE
    report: list[tuple[int, str]] = field(
        default_factory=list
    )  # (logging level, message) of the data check

    def dataset(self, resolution: int, seed: int = 0) -> AgreeDataset:
        """The training dataset for a model of input size `resolution`."""
        return AgreeDataset(
            self.records,
            self.images,
            resolution,
            self.terms,
            seed=seed,
            grounding=self.grounding,
            objects=self.objects,
            vg_vocab=self.vg_vocab,
            vg_images=self.vg_images,
            vg_masked=self.vg_masked,
            augment=self.augment,
        )


class _Loading:
    """The start-up pass: one `load_<input>` method per Input of training.slots, run in registry order. Each
    opens its files and looks up, over the whole training file, every item the examples will need,
    counting misses (data.Misses: an InputError above --max-missing-fraction)."""

    def __init__(self, args: argparse.Namespace, paths: DataPaths, terms: Sequence[str]):
        self.args, self.paths, self.terms = args, paths, tuple(terms)
        self.slots = ordered(slots_of(terms))
        self.inputs = TrainInputs([], None, self.terms, augment=getattr(args, "augment", NONE))
        self.misses: list[Misses] = []
        self.notes: list[str] = []
        self.vg_entries: list = []
        self.vg_found: list[bool] = []

    def run(self) -> TrainInputs:
        for inp in inputs_of(self.slots):
            getattr(self, f"load_{inp.name}")(inp)
        report = enforce_missing(self.misses, self.args.max_missing_fraction)
        report += [(logging.INFO, f"start-up data check: {line}") for line in self.notes]
        records = self.inputs.records
        for name in self.slots:
            slot = SLOTS[name]
            if slot.falls_back is not None:
                n = sum(bool(slot.falls_back(self.inputs, r)) for r in records)
                line = f"{n} of {len(records)} {slot.falls_back_note}"
                report.append((logging.INFO, f"start-up data check: {line}"))
        self.inputs.report = report
        return self.inputs

    def _flag(self, inp: Input) -> str:
        return input_flag(self.terms, inp)

    def _masks(self, inp: Input, base: ImageArchive) -> tuple[MaskedImages, DataFile]:
        """Open the file of a choice input (mask boxes over `base`, or masked copies)."""
        f = chosen_file(self.paths, inp)
        if f is None:  # none present: the same error as the start-up file check
            flag, what, path = next(
                r for r in required_files(self.terms, self.paths) if inp.what in r[1]
            )
            raise InputError(f"{flag}: {what} not found: {path}")
        path, what = self.paths.file(f.dest), f"{self._flag(inp)}: {f.what} ({f.flag})"
        self.notes.append(f"{inp.what}: {f.what} ({f.masks}) from {path}")
        if f.masks == "boxes":
            return BoxMasks(MaskBoxes(path, what), base), f
        return MaskedArchive(ImageArchive(path, what)), f

    def load_train(self, inp: Input) -> None:
        needs = {k for s in self.slots for k in SLOTS[s].needs}
        paths, args = self.paths, self.args
        records = load_train_records(
            paths.train_data,
            args.img_key,
            args.caption_key,
            need_segs="segs" in needs,
            need_preds="preds" in needs,
        )
        images = ImageArchive(
            paths.train_images, "--train-data: train image archive (--train-images)"
        )
        missing = [r.image_key for r in records if r.image_key not in images]
        if missing:
            raise InputError(
                f"--train-images: {paths.train_images} has no image for {len(missing)} image_id(s) "
                f"of {paths.train_data} (first: {missing[0]!r})"
            )
        self.inputs.records, self.inputs.images = records, images

    def load_grounding_masks(self, inp: Input) -> None:
        masks, f = self._masks(inp, self.inputs.images)
        self.inputs.grounding = masks
        m = Misses(
            f.item,
            f"{self._flag(inp)} ({f.flag})",
            str(masks.path),
            "captions with a grounded label",
            "the masked-square substitute",
        )
        for r in self.inputs.records:
            if r.grounding_key is None:
                continue
            if isinstance(masks, BoxMasks) and r.grounding_key in masks.boxes:
                drawn_on = masks.boxes.image_id(r.grounding_key)
                if drawn_on != r.image_key:
                    raise InputError(
                        f"{f.flag}: {masks.path}: mask {r.grounding_key!r} is drawn on image "
                        f"{drawn_on!r}, but {r.where} has image_id {r.image_key!r}"
                    )
            m.check(r.grounding_key in masks, r.grounding_key, r.where)
        self.misses.append(m)

    def load_vg_pairs(self, inp: Input) -> None:
        flag, paths, records = self._flag(inp), self.paths, self.inputs.records
        objects = self.inputs.objects = load_objects(paths.train_objects)
        m = Misses(
            "objects line",
            f"{flag} (--train-objects)",
            ", ".join(map(str, paths.train_objects)),
            "train images",
            "an empty object list (the substitute pair)",
        )
        first_use: dict[str, str] = {}
        for r in records:
            first_use.setdefault(r.stem, r.where)
        for stem, where in first_use.items():
            m.check(stem in objects, stem, where)
        vg_images = self.inputs.vg_images = ImageArchive(
            paths.vg_images, f"{flag}: Visual Genome images (--vg-images)"
        )
        images = Misses(
            "Visual Genome image",
            f"{flag} (--vg-images)",
            str(paths.vg_images),
            "usable VG entries of the train images' objects",
            "the entry left out (an image without any usable entry takes the substitute pair)",
        )
        words = {o for r in records for o in objects.get(r.stem, [])}
        self.vg_entries = load_vg_entries(paths.vg_vocab, words)
        self.vg_found = [
            images.check(e.image_id in vg_images, e.image_id, e.where) for e in self.vg_entries
        ]
        self.inputs.vg_vocab = vg_vocab(e for e, ok in zip(self.vg_entries, self.vg_found) if ok)
        self.misses += [m, images]

    def load_vg_masks(self, inp: Input) -> None:
        masks, f = self._masks(inp, self.inputs.vg_images)
        self.inputs.vg_masked = masks
        m = Misses(
            f.item,
            f"{self._flag(inp)} ({f.flag})",
            str(masks.path),
            "usable VG entries of the train images' objects",
            "the entry left out (an image without any usable entry takes the substitute pair)",
        )
        for k, e in enumerate(self.vg_entries):
            key = vg_masked_key(e.word, e.image_id)
            if isinstance(masks, BoxMasks) and key in masks.boxes:
                drawn_on = masks.boxes.image_id(key)
                if drawn_on != e.image_id:
                    raise InputError(
                        f"{f.flag}: {masks.path}: mask {key!r} is drawn on image {drawn_on!r}, "
                        f"not on VG image {e.image_id!r}"
                    )
            self.vg_found[k] = m.check(key in masks, key, e.where) and self.vg_found[k]
        self.inputs.vg_vocab = vg_vocab(e for e, ok in zip(self.vg_entries, self.vg_found) if ok)
        self.misses.append(m)


def load_train_inputs(
    args: argparse.Namespace, paths: DataPaths, terms: Sequence[str]
) -> TrainInputs:
    """Read the files the enabled terms need and check, over the whole training file, that every grounding
    mask, objects line and Visual Genome image it needs is there (data.enforce_missing: an InputError
    above --max-missing-fraction)."""
    return _Loading(args, paths, terms).run()


def build_train_dataset(
    args: argparse.Namespace, paths: DataPaths, terms: Sequence[str], resolution: int
) -> AgreeDataset:
    """load_train_inputs, then the dataset for a model of input size `resolution`."""
    return load_train_inputs(args, paths, terms).dataset(resolution, args.seed)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (resume at the exact step)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's order in the next iteration."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_train_loader(
    dataset: AgreeDataset,
    batch_size: int,
    workers: int,
    world_size: int,
    rank: int,
    seed: int,
    pin_memory: bool = False,
) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, sharded loader that drops the last incomplete batch."""
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    return loader, sampler
