"""Training and validation data: the AGREE example of spec 3.1, read from the release's npz/jsonl files.

Each loss flag loads only the files its term needs. Per-example randomness (augmentation, Visual
Genome choice, masked square) is seeded by (seed, epoch, index), so a batch is the same whatever the
number of workers or ranks, and a resumed run sees the same data as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from agree.io import InputError, iter_jsonl, read_json
from clip.clip import tokenize
from agree.images import ImageArchive
from clip.transform import array_to_tensor

NUM_SLOTS = 5          # entity slots per caption (prompts and masked captions)
MAX_SEG_WORDS = 7      # longer textual entities are skipped
SQUARE = 32            # side of the zeroed square of the image fallbacks
PROMPT = "a photo containing {}"
MASK_TOKEN = "[MASK]"


# --------------------------------------------------------------------------- paths
@dataclass
class DataPaths:
    """Every file fine-tuning may read (which are read depends on the loss flags)."""
    train_data: Path
    train_images: Path
    val_data: Optional[Path]
    val_images: Path
    train_objects: Path
    grounding_images: Path
    vg_images: Path
    vg_mask_images: Path
    vg_vocab: Path


def resolve_paths(args: argparse.Namespace) -> DataPaths:
    """Apply the release-layout defaults to every data path not given by a flag."""
    train = Path(args.train_data)
    if args.data_root is not None:
        root = Path(args.data_root)
    elif train.parent.name == "annotation":
        root = train.parent.parent
    else:
        root = Path("./tmp/datasets/flickr30k_images")
    vg_root = Path(args.vg_root) if args.vg_root is not None else root.parent.parent / "VG"
    ann = root / "annotation"

    def pick(value: Optional[str], default: Path) -> Path:
        return Path(value) if value is not None else default

    return DataPaths(
        train_data=train,
        train_images=pick(args.train_images, ann / "flickr30k_train_images.npz"),
        val_data=Path(args.val_data) if args.val_data else None,
        val_images=pick(args.val_images, ann / "flickr30k_val_images.npz"),
        train_objects=pick(args.train_objects, root / "objects" / "flickr30k_train_imgs_objs.jsonl"),
        grounding_images=pick(args.grounding_images, root / "flickr30k_visual_grounding.224.npz"),
        vg_images=pick(args.vg_images, vg_root / "VG_images.224.npz"),
        vg_mask_images=pick(args.vg_mask_images, vg_root / "VG_mask_images.224.npz"),
        vg_vocab=pick(args.vg_vocab, vg_root / "vocab_VG_images_objs.jsonl"),
    )


def required_files(args: argparse.Namespace, paths: DataPaths) -> list[tuple[str, str, Path]]:
    """(flag, description, path) of every file the enabled terms need."""
    req = [("--train-data", "training captions", paths.train_data),
           ("--train-data", "train image archive (--train-images)", paths.train_images)]
    if paths.val_data is not None:
        req += [("--val-data", "validation captions", paths.val_data),
                ("--val-data", "val image archive (--val-images)", paths.val_images)]
    for flag, on in (("--is-da-loss", args.is_da_loss), ("--is-da-mask", args.is_da_mask)):
        if on:
            req += [(flag, "objects per train image (--train-objects)", paths.train_objects),
                    (flag, "Visual Genome vocabulary (--vg-vocab)", paths.vg_vocab),
                    (flag, "Visual Genome images (--vg-images)", paths.vg_images)]
    if args.is_da_mask:
        req.append(("--is-da-mask", "Visual Genome masked images (--vg-mask-images)", paths.vg_mask_images))
    if args.is_vg:
        req.append(("--is-vg", "visual grounding images (--grounding-images)", paths.grounding_images))
    return req


def check_files(args: argparse.Namespace, paths: DataPaths) -> None:
    """Raise InputError naming the flag and the path of the first missing file."""
    for flag, what, path in required_files(args, paths):
        if not path.is_file():
            raise InputError(f"{flag}: {what} not found: {path}")
    kind = args.dataset_type
    if kind == "auto":
        for flag, path in (("--train-data", paths.train_data), ("--val-data", paths.val_data)):
            if path is not None and path.suffix not in (".jsonl", ".json"):
                raise InputError(f"{flag}: cannot infer the format of {path} "
                                 "(expected .jsonl/.json; pass --dataset-type json)")


# --------------------------------------------------------------------------- example construction
def entity_texts(caption: str, segs: Sequence[str], slots: int = NUM_SLOTS) -> tuple[list[str], list[str]]:
    """Prompts 'a photo containing {seg}' and masked captions of the first `slots` short segs, padded with ''."""
    kept = [s for s in segs if len(s.split(" ")) <= MAX_SEG_WORDS][:slots]
    prompts = [PROMPT.format(s) for s in kept]
    masked = [caption.replace(s, MASK_TOKEN) for s in kept]
    pad = [""] * (slots - len(kept))
    return prompts + pad, masked + pad


def grounding_label(preds: Sequence[dict]) -> Optional[str]:
    """First grounded label other than 'object', or None."""
    for entry in preds:
        for label in entry:
            if label != "object":
                return label
    return None


def zero_square(arr: np.ndarray, rng: np.random.Generator, size: int = SQUARE) -> np.ndarray:
    """Copy of a stored image array with a random size x size square set to 0 (clipped at the border)."""
    out = np.array(arr, copy=True)
    channels_first = out.ndim == 3 and out.shape[0] == 3 and out.shape[-1] != 3
    h, w = (out.shape[1], out.shape[2]) if channels_first else (out.shape[0], out.shape[1])
    y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
    if channels_first:
        out[:, y:y + size, x:x + size] = 0
    else:
        out[y:y + size, x:x + size] = 0
    return out


def pick_vg_object(objects: Sequence[str], vocab: dict[str, list[str]],
                   rng: np.random.Generator) -> Optional[tuple[str, str]]:
    """Shuffle the image's objects; for the first with a usable VG image return (object, VG image id)."""
    for k in rng.permutation(len(objects)):
        candidates = vocab.get(objects[k])
        if candidates:
            return objects[k], candidates[int(rng.integers(0, len(candidates)))]
    return None


@dataclass
class TrainRecord:
    """What one training example needs from its jsonl line."""
    image_key: str
    stem: str
    caption: str
    segs: list[str] = field(default_factory=list)
    grounding_key: Optional[str] = None


def _str_list(value: object, what: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: {what} must be a list of strings")
    return value


def load_train_records(path: Path, img_key: str, caption_key: str, need_segs: bool,
                       need_preds: bool) -> list[TrainRecord]:
    """Parse flickr30k_train_pred.jsonl; errors name file:line and the key."""
    required = [img_key, caption_key, "image_id"] + (["segs"] if need_segs else []) + (["preds"] if need_preds else [])
    records = []
    for lineno, rec in iter_jsonl(path, required):
        where = f"{path}:{lineno}"
        caption = rec[caption_key]
        if not isinstance(caption, str):
            raise InputError(f"{where}: {caption_key!r} must be a string (set --caption-key)")
        image = rec[img_key]
        if not isinstance(image, str):
            raise InputError(f"{where}: {img_key!r} must be an image path string (set --img-key)")
        r = TrainRecord(image_key=str(rec["image_id"]), stem=Path(image).stem, caption=caption)
        if need_segs:
            r.segs = _str_list(rec["segs"], "'segs'", where)
        if need_preds:
            preds = rec["preds"]
            if not isinstance(preds, list) or not all(isinstance(p, dict) for p in preds):
                raise InputError(f"{where}: 'preds' must be a list of {{label: score}} objects")
            label = grounding_label(preds)
            r.grounding_key = None if label is None else f"{r.stem}_{label}"
        records.append(r)
    if not records:
        raise InputError(f"--train-data: {path} has no records")
    return records


def load_objects(path: Path) -> dict[str, list[str]]:
    """Image stem -> objects seen in it (objects/flickr30k_train_imgs_objs.jsonl)."""
    out: dict[str, list[str]] = {}
    for lineno, rec in iter_jsonl(path, ("image_id", "image_objects")):
        out[str(rec["image_id"])] = _str_list(rec["image_objects"], "'image_objects'", f"{path}:{lineno}")
    return out


def load_vg_vocab(path: Path, words: set[str], vg_images: ImageArchive,
                  vg_masked: Optional[ImageArchive]) -> dict[str, list[str]]:
    """Object word -> VG image ids whose 'object' entry is non-empty and whose images are present."""
    out: dict[str, list[str]] = {}
    dropped = 0
    for lineno, rec in iter_jsonl(path, ("vocab", "objects")):
        word = rec["vocab"]
        if word not in words:
            continue
        if not isinstance(rec["objects"], list):
            raise InputError(f"{path}:{lineno}: 'objects' must be a list")
        ids = []
        for obj in rec["objects"]:
            if not isinstance(obj, dict) or "image_id" not in obj:
                raise InputError(f"{path}:{lineno}: each object needs an 'image_id'")
            if not obj.get("object"):
                continue
            g = str(obj["image_id"])
            if g not in vg_images or (vg_masked is not None and f"{word}_{g}" not in vg_masked):
                dropped += 1
                continue
            ids.append(g)
        if ids:
            out.setdefault(word, []).extend(ids)
    if dropped:
        logging.warning("%d Visual Genome entries of %s have no image in the archives; they are skipped",
                        dropped, path)
    return out


# --------------------------------------------------------------------------- datasets
def _image(archive: ImageArchive, key: str, arr: Optional[np.ndarray], resolution: int, is_train: bool,
           seed: int) -> torch.Tensor:
    """Preprocess a stored array with the torch RNG seeded for this example (restored afterwards)."""
    if arr is None:
        arr = archive[key]
    try:
        if not (is_train and arr.dtype == np.uint8):      # deterministic preprocessing: no RNG involved
            return array_to_tensor(arr, resolution, is_train)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)    # CPU generator only (torch.manual_seed also seeds CUDA)
            return array_to_tensor(arr, resolution, is_train)
    except ValueError as e:
        raise InputError(f"{archive.path}: image {key!r}: {e}") from None


class AgreeDataset(Dataset):
    """One spec-3.1 example per caption: image + caption tokens, and what the enabled terms need."""

    def __init__(self, records: list[TrainRecord], images: ImageArchive, resolution: int,
                 terms: Sequence[str], seed: int = 0, grounding: Optional[ImageArchive] = None,
                 objects: Optional[dict[str, list[str]]] = None, vg_vocab: Optional[dict[str, list[str]]] = None,
                 vg_images: Optional[ImageArchive] = None, vg_masked: Optional[ImageArchive] = None,
                 augment: bool = True):
        self.records, self.images, self.resolution = records, images, resolution
        self.terms = set(terms)
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.grounding, self.objects, self.vg_vocab = grounding, objects or {}, vg_vocab or {}
        self.vg_images, self.vg_masked = vg_images, vg_masked
        self.need_entities = bool(self.terms & {"prompt", "text_mask"})
        self.need_da = bool(self.terms & {"da_contrastive", "da_mask"})
        if self.need_da and vg_images is None:
            raise ValueError("VG terms need vg_images")
        if "da_mask" in self.terms and vg_masked is None:
            raise ValueError("da_mask needs vg_masked")
        if "grounding_mask" in self.terms and grounding is None:
            raise ValueError("grounding_mask needs grounding")

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
        if self.need_entities:
            prompts, masked = entity_texts(rec.caption, rec.segs)
            texts += prompts + masked
        if self.need_da:
            pick = pick_vg_object(self.objects.get(rec.stem, []), self.vg_vocab, rng)
            if pick is not None:
                obj, g = pick
                out["da_image"] = _image(self.vg_images, g, None, res, aug, int(seeds[1]))
                texts.append(PROMPT.format(obj))
                if "da_mask" in self.terms:
                    key = f"{obj}_{g}"
                    out["da_image_masked"] = _image(self.vg_masked, key, None, res, aug, int(seeds[2]))
            else:  # spec 3.1.3 fallback: the example itself, and a square-masked copy of its image
                out["da_image"] = out["image"]
                texts.append(rec.caption)
                if "da_mask" in self.terms:
                    out["da_image_masked"] = _image(self.images, rec.image_key, zero_square(arr, rng),
                                                    res, aug, int(seeds[2]))
        if "grounding_mask" in self.terms:
            if rec.grounding_key is not None and rec.grounding_key in self.grounding:
                out["vg_masked"] = _image(self.grounding, rec.grounding_key, None, res, aug, int(seeds[3]))
            else:
                out["vg_masked"] = _image(self.images, rec.image_key, zero_square(arr, rng), res, aug, int(seeds[3]))
        tokens = tokenize(texts)
        out["text"] = tokens[0]
        if self.need_entities:
            out["prompts"] = tokens[1:1 + NUM_SLOTS]
            out["masked"] = tokens[1 + NUM_SLOTS:1 + 2 * NUM_SLOTS]
        if self.need_da:
            out["da_text"] = tokens[-1]
        return out


def build_train_dataset(args: argparse.Namespace, paths: DataPaths, terms: Sequence[str],
                        resolution: int) -> AgreeDataset:
    """Read the files the enabled terms need and build the training dataset."""
    terms = set(terms)
    need_da = bool(terms & {"da_contrastive", "da_mask"})
    records = load_train_records(paths.train_data, args.img_key, args.caption_key,
                                 need_segs=bool(terms & {"prompt", "text_mask"}),
                                 need_preds="grounding_mask" in terms)
    images = ImageArchive(paths.train_images, "--train-data: train image archive (--train-images)")
    missing = [r.image_key for r in records if r.image_key not in images]
    if missing:
        raise InputError(f"--train-images: {paths.train_images} has no image for {len(missing)} image_id(s) "
                         f"of {paths.train_data} (first: {missing[0]!r})")
    grounding = objects = vocab = vg_images = vg_masked = None
    if "grounding_mask" in terms:
        grounding = ImageArchive(paths.grounding_images, "--is-vg: visual grounding images (--grounding-images)")
        absent = sum(1 for r in records if r.grounding_key is not None and r.grounding_key not in grounding)
        if absent:
            logging.warning("%d grounded entities have no image in %s; those examples use the masked-square "
                            "fallback", absent, paths.grounding_images)
    if need_da:
        flag = "--is-da-mask" if "da_mask" in terms else "--is-da-loss"
        objects = load_objects(paths.train_objects)
        vg_images = ImageArchive(paths.vg_images, f"{flag}: Visual Genome images (--vg-images)")
        if "da_mask" in terms:
            vg_masked = ImageArchive(paths.vg_mask_images, "--is-da-mask: Visual Genome masked images "
                                                           "(--vg-mask-images)")
        words = {o for r in records for o in objects.get(r.stem, [])}
        vocab = load_vg_vocab(paths.vg_vocab, words, vg_images, vg_masked)
    return AgreeDataset(records, images, resolution, sorted(terms), seed=args.seed, grounding=grounding,
                        objects=objects, vg_vocab=vocab, vg_images=vg_images, vg_masked=vg_masked)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (resume at the exact step)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of this rank's order in the next iteration."""
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_train_loader(dataset: AgreeDataset, batch_size: int, workers: int, world_size: int, rank: int,
                      seed: int, pin_memory: bool = False) -> tuple[DataLoader, ResumableSampler]:
    """Shuffled, sharded loader that drops the last incomplete batch."""
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=pin_memory, persistent_workers=False)
    return loader, sampler


# --------------------------------------------------------------------------- validation
@dataclass
class ValData:
    """Validation images (archive keys = index in the json) and their captions."""
    images: ImageArchive
    keys: list[str]
    captions: list[str]
    caption_image: list[int]   # image index of every caption


def load_val(path: Path, images_path: Path, caption_key: str) -> ValData:
    """Read flickr30k_val.json (list of {image, caption: [5 captions]}) and its image archive."""
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise InputError(f"--val-data: {path} must be a non-empty JSON list of {{image, caption}} objects")
    images = ImageArchive(images_path, "--val-data: val image archive (--val-images)")
    captions: list[str] = []
    owner: list[int] = []
    for i, rec in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(rec, dict) or caption_key not in rec:
            raise InputError(f"{where}: missing key {caption_key!r} (set --caption-key)")
        caps = rec[caption_key]
        caps = [caps] if isinstance(caps, str) else caps
        caps = _str_list(caps, repr(caption_key), where)
        if str(i) not in images:
            raise InputError(f"--val-images: {images_path} has no image with key {str(i)!r} (entry {i} of {path})")
        captions += caps
        owner += [i] * len(caps)
    return ValData(images, [str(i) for i in range(len(data))], captions, owner)


class ValImages(Dataset):
    """Validation images, eval preprocessing."""

    def __init__(self, val: ValData, resolution: int):
        self.val, self.resolution = val, resolution

    def __len__(self) -> int:
        return len(self.val.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.val.images.load_tensor(self.val.keys[index], self.resolution, is_train=False)
