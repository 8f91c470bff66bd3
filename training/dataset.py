"""The AGREE training example of spec 3.1 as a torch Dataset, and the resumable sharded loader.

Per-example randomness (augmentation, Visual Genome choice, masked square) is seeded by (seed, epoch,
index), so a batch is the same whatever the number of workers or ranks, and a resumed run sees the
same data as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from agree.entities import TRAIN_SLOTS, prompt, training_slots
from agree.images import ImageArchive
from agree.io import InputError
from agree.layout import vg_masked_key
from clip.clip import tokenize
from clip.transform import array_to_tensor
from training.data import (
    DataPaths,
    Misses,
    TrainRecord,
    enforce_missing,
    load_objects,
    load_train_records,
    load_vg_vocab,
    slot_flag,
)
from training.terms import slots_of

SQUARE = 32  # side of the zeroed square of the image fallbacks


def zero_square(arr: np.ndarray, rng: np.random.Generator, size: int = SQUARE) -> np.ndarray:
    """Copy of a stored image array with a random size x size square set to 0 (clipped at the border)."""
    out = np.array(arr, copy=True)
    channels_first = out.ndim == 3 and out.shape[0] == 3 and out.shape[-1] != 3
    h, w = (out.shape[1], out.shape[2]) if channels_first else (out.shape[0], out.shape[1])
    y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
    if channels_first:
        out[:, y : y + size, x : x + size] = 0
    else:
        out[y : y + size, x : x + size] = 0
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


def _image(
    archive: ImageArchive,
    key: str,
    arr: Optional[np.ndarray],
    resolution: int,
    is_train: bool,
    seed: int,
) -> torch.Tensor:
    """Preprocess a stored array with the torch RNG seeded for this example (restored afterwards)."""
    if arr is None:
        arr = archive[key]
    try:
        if not (is_train and arr.dtype == np.uint8):  # deterministic preprocessing: no RNG involved
            return array_to_tensor(arr, resolution, is_train)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                seed
            )  # CPU generator only (torch.manual_seed also seeds CUDA)
            return array_to_tensor(arr, resolution, is_train)
    except ValueError as e:
        raise InputError(f"{archive.path}: image {key!r}: {e}") from None


class AgreeDataset(Dataset):
    """One spec-3.1 example per caption: image + caption tokens, and the slots the enabled terms read."""

    def __init__(
        self,
        records: list[TrainRecord],
        images: ImageArchive,
        resolution: int,
        terms: Sequence[str],
        seed: int = 0,
        grounding: Optional[ImageArchive] = None,
        objects: Optional[dict[str, list[str]]] = None,
        vg_vocab: Optional[dict[str, list[str]]] = None,
        vg_images: Optional[ImageArchive] = None,
        vg_masked: Optional[ImageArchive] = None,
        augment: bool = True,
    ):
        self.records, self.images, self.resolution = records, images, resolution
        self.slots = slots_of(terms)
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.grounding, self.objects, self.vg_vocab = grounding, objects or {}, vg_vocab or {}
        self.vg_images, self.vg_masked = vg_images, vg_masked
        for slot, archive in (
            ("vg_image", vg_images),
            ("vg_image_masked", vg_masked),
            ("grounding_masked", grounding),
        ):
            if slot in self.slots and archive is None:
                raise ValueError(f"the {slot!r} slot needs its image archive")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose per-example randomness __getitem__ uses."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rec = self.records[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        seeds = rng.integers(0, 2**62, size=4)
        res, aug = self.resolution, self.augment
        arr = self.images[rec.image_key]
        out = {"image": _image(self.images, rec.image_key, arr, res, aug, int(seeds[0]))}
        texts = [rec.caption]
        entities = "prompts" in self.slots or "masked" in self.slots
        if entities:
            slots = training_slots(rec.caption, rec.segs)
            texts += slots.prompts + slots.masked
        if "vg_image" in self.slots:
            pick = pick_vg_object(self.objects.get(rec.stem, []), self.vg_vocab, rng)
            if pick is not None:
                obj, g = pick
                out["vg_image"] = _image(self.vg_images, g, None, res, aug, int(seeds[1]))
                texts.append(prompt(obj))
                if "vg_image_masked" in self.slots:
                    out["vg_image_masked"] = _image(
                        self.vg_masked, vg_masked_key(obj, g), None, res, aug, int(seeds[2])
                    )
            else:  # spec 3.1.3 fallback: the example itself, and a square-masked copy of its image
                out["vg_image"] = out["image"]
                texts.append(rec.caption)
                if "vg_image_masked" in self.slots:
                    out["vg_image_masked"] = _image(
                        self.images, rec.image_key, zero_square(arr, rng), res, aug, int(seeds[2])
                    )
        if "grounding_masked" in self.slots:
            if rec.grounding_key is not None and rec.grounding_key in self.grounding:
                out["grounding_masked"] = _image(
                    self.grounding, rec.grounding_key, None, res, aug, int(seeds[3])
                )
            else:
                out["grounding_masked"] = _image(
                    self.images, rec.image_key, zero_square(arr, rng), res, aug, int(seeds[3])
                )
        tokens = tokenize(texts)
        out["text"] = tokens[0]
        if entities:
            out["prompts"] = tokens[1 : 1 + TRAIN_SLOTS]
            out["masked"] = tokens[1 + TRAIN_SLOTS : 1 + 2 * TRAIN_SLOTS]
        if "vg_image" in self.slots:
            out["vg_text"] = tokens[-1]
        return out


@dataclass
class TrainInputs:
    """Everything the training examples are built from, read and checked before the run starts."""

    records: list[TrainRecord]
    images: ImageArchive
    terms: tuple[str, ...]
    grounding: Optional[ImageArchive] = None
    objects: Optional[dict[str, list[str]]] = None
    vg_vocab: Optional[dict[str, list[str]]] = None
    vg_images: Optional[ImageArchive] = None
    vg_masked: Optional[ImageArchive] = None
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
        )


def load_train_inputs(
    args: argparse.Namespace, paths: DataPaths, terms: Sequence[str]
) -> TrainInputs:
    """Read the files the enabled terms need and check, over the whole training file, that every grounding
    image, objects line and Visual Genome image it needs is there (data.enforce_missing: an InputError
    above --max-missing-fraction)."""
    slots = slots_of(terms)
    records = load_train_records(
        paths.train_data,
        args.img_key,
        args.caption_key,
        need_segs=bool(slots & {"prompts", "masked"}),
        need_preds="grounding_masked" in slots,
    )
    images = ImageArchive(paths.train_images, "--train-data: train image archive (--train-images)")
    missing = [r.image_key for r in records if r.image_key not in images]
    if missing:
        raise InputError(
            f"--train-images: {paths.train_images} has no image for {len(missing)} image_id(s) "
            f"of {paths.train_data} (first: {missing[0]!r})"
        )
    inputs = TrainInputs(records, images, tuple(terms))
    misses: list[Misses] = []
    fallbacks: list[str] = []
    if "grounding_masked" in slots:
        flag = slot_flag(terms, "grounding_masked")
        inputs.grounding = ImageArchive(
            paths.grounding_images, f"{flag}: visual grounding images (--grounding-images)"
        )
        m = Misses(
            "grounding image",
            f"{flag} (--grounding-images)",
            str(paths.grounding_images),
            "captions with a grounded label",
            "the masked-square substitute of spec 3.1.4",
        )
        for r in records:
            if r.grounding_key is not None:
                m.check(r.grounding_key in inputs.grounding, r.grounding_key, r.where)
        misses.append(m)
        fallbacks.append(
            f"{sum(r.grounding_key is None for r in records)} of {len(records)} captions have no "
            "grounded label (spec 3.1.4: masked-square substitute)"
        )
    if "vg_image" in slots:
        flag = slot_flag(terms, "vg_image")
        objects = inputs.objects = load_objects(paths.train_objects)
        m = Misses(
            "objects line",
            f"{flag} (--train-objects)",
            ", ".join(map(str, paths.train_objects)),
            "train images",
            "an empty object list (spec 3.1.3's substitute pair)",
        )
        first_use: dict[str, str] = {}
        for r in records:
            first_use.setdefault(r.stem, r.where)
        for stem, where in first_use.items():
            m.check(stem in objects, stem, where)
        misses.append(m)
        inputs.vg_images = ImageArchive(
            paths.vg_images, f"{flag}: Visual Genome images (--vg-images)"
        )
        image_misses = Misses(
            "Visual Genome image",
            f"{flag} (--vg-images)",
            str(paths.vg_images),
            "usable VG entries of the train images' objects",
            "the entry left out (an image without any usable entry takes spec 3.1.3's "
            "substitute pair)",
        )
        masked_misses = None
        if "vg_image_masked" in slots:
            mflag = slot_flag(terms, "vg_image_masked")
            inputs.vg_masked = ImageArchive(
                paths.vg_mask_images, f"{mflag}: Visual Genome masked images (--vg-mask-images)"
            )
            masked_misses = Misses(
                "Visual Genome masked image",
                f"{mflag} (--vg-mask-images)",
                str(paths.vg_mask_images),
                image_misses.unit,
                image_misses.fallback,
            )
        words = {o for r in records for o in objects.get(r.stem, [])}
        vocab = inputs.vg_vocab = load_vg_vocab(
            paths.vg_vocab, words, inputs.vg_images, inputs.vg_masked, image_misses, masked_misses
        )
        misses += [image_misses] + ([masked_misses] if masked_misses is not None else [])
        no_object = sum(not any(vocab.get(o) for o in objects.get(r.stem, [])) for r in records)
        fallbacks.append(
            f"{no_object} of {len(records)} captions' images list no object with a usable VG entry "
            "(spec 3.1.3: substitute pair)"
        )
    inputs.report = enforce_missing(misses, args.max_missing_fraction)
    inputs.report += [(logging.INFO, f"start-up data check: {line}") for line in fallbacks]
    return inputs


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
