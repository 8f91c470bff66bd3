"""The whole preparation: raw downloads -> every file of the release layout (docs/data.md) under --out.

Order of work: read the split file (and --boxes); read Visual Genome's image list (excluding the
dataset's val/test images) and choose VG images per vocabulary word; prepare every dataset image in
worker processes and stream the results into the layout's files; write the VG images that the
objects files name; write manifests; rename the folders into place.

VG/ is shared by the datasets prepared under one --out (the layout has one VG folder): its manifest
records, per dataset, the VG images excluded as that dataset's val/test images and the words its
objects files use. A run for another dataset rebuilds VG/ for the union of both, so it stays free
of either dataset's test images and serves both.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from tqdm import tqdm

from agree.io import InputError, atomic_write, dumps, write_json
from agree.layout import (
    Layout,
    caption_query_id,
    grounding_key,
    val_image_key,
    vg_masked_key,
)
from agree.masks import PixelBox, fill_boxes
from agree.masks import record as mask_record
from agree.npz import NpzWriter
from dataprep import datasets, karpathy
from dataprep import visual_genome as vg
from dataprep.boxes import read_boxes
from dataprep.images import STORAGE, Storage
from dataprep.item import (
    ItemTask,
    Outcome,
    TextSettings,
    VgResult,
    VgTask,
    prepare_item,
    prepare_vg,
)
from dataprep.objects import image_objects
from dataprep.parallel import ordered_map
from dataprep.skips import SkipLog
from dataprep.staging import Target, check_settings, commit, inspect, staging_area, write_manifest
from dataprep.textual import EXTRACTORS, get_extractor

MASKS = ("boxes", "images")  # --masks: mask boxes read at load time, or the release's masked copies


@dataclass
class PrepareConfig:
    """Inputs and settings of one run (the flags of scripts/prepare_data.py)."""

    dataset: str
    raw: Path
    vg_raw: Path
    out: Path
    boxes: Optional[Path] = None
    resolution: int = 224
    storage: str = "uint8"
    masks: str = "boxes"
    extractor: str = "textblob"
    spacy_model: str = "en_core_web_sm"
    gold_entities: bool = True
    box_threshold: float = 0.5
    vg_per_word: int = 10
    max_missing_fraction: float = 0.0
    overwrite: bool = False
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    progress: bool = True
    log: Callable[[str], None] = print

    def settings(self) -> dict:
        """What determines the dataset folder's bytes besides the input files (recorded in its manifest)."""
        return {
            "dataset": self.dataset,
            "resolution": self.resolution,
            "storage": self.storage,
            "masks": self.masks,
            "extractor": self.extractor,
            "spacy_model": self.spacy_model if self.extractor == "spacy" else None,
            "gold_entities": self.gold_entities,
            "boxes": self.boxes is not None,
            "box_threshold": self.box_threshold,
            "vg_per_word": self.vg_per_word,
        }

    def vg_settings(self) -> dict:
        """What VG/ shares between datasets (recorded in its manifest)."""
        return {
            "resolution": self.resolution,
            "storage": self.storage,
            "masks": self.masks,
            "vg_per_word": self.vg_per_word,
        }


@dataclass
class PrepareReport:
    """What a run did."""

    layout: Layout
    skipped: bool = False  # True: the finished layout was already there (no-op)
    counts: dict = field(default_factory=dict)
    odd: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


def _check_config(cfg: PrepareConfig) -> None:
    spec = datasets.get_dataset(cfg.dataset)
    if cfg.resolution < 1:
        raise InputError(f"--resolution must be a positive number of pixels, got {cfg.resolution}")
    if cfg.storage not in STORAGE:
        raise InputError(
            f"--storage: unknown storage {cfg.storage!r} (choose from {', '.join(STORAGE)})"
        )
    if cfg.masks not in MASKS:
        raise InputError(f"--masks: unknown choice {cfg.masks!r} (choose from {', '.join(MASKS)})")
    if cfg.extractor not in EXTRACTORS:
        raise InputError(
            f"--extractor: unknown extractor {cfg.extractor!r} (choose from {', '.join(EXTRACTORS)})"
        )
    if cfg.vg_per_word < 1:
        raise InputError(f"--vg-per-word must be at least 1, got {cfg.vg_per_word}")
    if cfg.workers < 0:
        raise InputError(f"--workers must be >= 0, got {cfg.workers}")
    datasets.check_raw(spec, cfg.raw)
    if not Path(cfg.vg_raw).is_dir():
        raise InputError(f"--vg-raw: folder not found: {cfg.vg_raw}")
    for f in ("image_data.json", "objects.json"):
        if not (cfg.vg_raw / f).is_file():
            raise InputError(f"--vg-raw: Visual Genome file not found: {cfg.vg_raw / f}")
    if cfg.boxes is not None and not Path(cfg.boxes).is_file():
        raise InputError(f"--boxes: file not found: {cfg.boxes}")


class _Jsonl:
    """A JSONL file written record by record."""

    def __init__(self, stack: ExitStack, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = stack.enter_context(open(path, "wb"))
        self.count = 0

    def write(self, rec: dict) -> None:
        self.f.write(dumps(rec))
        self.f.write(b"\n")
        self.count += 1


def _npz(stack: ExitStack, path: Path) -> NpzWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = NpzWriter(path)
    stack.callback(w.close)
    return w


class _Masks:
    """Where masks go: a mask-box file (--masks boxes) or an archive of masked copies (--masks images)."""

    def __init__(
        self, stack: ExitStack, kind: str, boxes_path: Path, images_path: Path, storage: Storage
    ):
        self.storage = storage
        self.boxes = _Jsonl(stack, boxes_path) if kind == "boxes" else None
        self.images = _npz(stack, images_path) if kind == "images" else None
        self.count = 0

    def add(self, key: str, image_id: object, image, pixels: list[PixelBox]) -> None:
        """The mask `key` of the uint8 image stored under `image_id`."""
        if self.boxes is not None:
            self.boxes.write(mask_record(key, image_id, pixels))
        else:
            self.images.add(key, self.storage.encode(fill_boxes(image, pixels)))
        self.count += 1


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, total: int, desc: str):
        return tqdm(
            total=total,
            desc=desc,
            unit="img",
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=0.5,
        )


def _absorb(skips: SkipLog, outcome: Outcome) -> None:
    for kind, message in outcome.skips:
        skips.skip(kind, message)
    for kind, message in outcome.notes:
        skips.note(kind, message)


class Preparation:
    """One run of `prepare` (state shared by its stages)."""

    def __init__(self, cfg: PrepareConfig, other_datasets: Optional[dict] = None):
        self.cfg = cfg
        self.others = other_datasets or {}  # VG records of the other datasets sharing VG/
        self.skips = SkipLog(cfg.max_missing_fraction, cfg.log)
        self.progress = _Progress(cfg.progress)
        self.counts: dict = {}
        self.seconds: dict = {}
        self.storage = Storage.from_clip(cfg.storage)
        self.spec = datasets.get_dataset(cfg.dataset)

    # ------------------------------------------------------------------ inputs
    def read_inputs(self) -> None:
        cfg, log = self.cfg, self.cfg.log
        t = time.perf_counter()
        split_file = self.spec.split_path(cfg.raw)
        self.entries = karpathy.read_split_file(split_file, self.spec, self.skips)
        by_split = {s: sum(e.split == s for e in self.entries) for s in ("train", "val", "test")}
        log(
            f"{split_file}: {len(self.entries)} images ({by_split['train']} train, {by_split['val']} val, "
            f"{by_split['test']} test)"
        )
        self.detections: dict = {}
        if cfg.boxes is not None:
            self.detections, n = read_boxes(cfg.boxes, self.skips)
            self.skips.total("boxes", n)
            names = {Path(e.file).name for e in self.entries}
            unknown = sorted(set(self.detections) - names)
            if unknown:
                self.skips.note(
                    "--boxes images not in the split file (ignored)", unknown[0], len(unknown)
                )
            log(f"{cfg.boxes}: {n} boxes for {len(set(self.detections) & names)} images")
        self.sentences_dir = datasets.sentences_dir(self.spec, cfg.raw, cfg.gold_entities)
        self.annotations_dir = datasets.annotations_dir(self.spec, cfg.raw, cfg.gold_entities)
        if cfg.boxes is not None:
            self.grounding = "boxes"
        elif self.annotations_dir is not None:
            self.grounding = "gold"
        else:
            self.grounding = "none"
        source = {
            "boxes": f"detector boxes ({cfg.boxes}, score >= {cfg.box_threshold:g})",
            "gold": f"Flickr30k Entities boxes ({self.annotations_dir})",
            "none": None,
        }[self.grounding]
        if source is None:
            log(
                "no grounding source (--boxes, or flickr30k_entities/Annotations): preds stay empty and no grounding "
                "file is written; fine-tuning with --is-vg then needs one"
            )
        else:
            log(f"grounding: {source}")
        log(
            "textual entities: "
            + (
                f"Flickr30k Entities phrases ({self.sentences_dir}), else "
                if self.sentences_dir is not None
                else ""
            )
            + cfg.extractor
        )
        get_extractor(
            cfg.extractor, cfg.spacy_model
        )  # a missing extractor stops the run here, not in a worker
        self.seconds["read inputs"] = time.perf_counter() - t

    def choose_vg(self) -> None:
        cfg, log = self.cfg, self.cfg.log
        t = time.perf_counter()
        self.vg_images = vg.read_image_data(cfg.vg_raw / "image_data.json")
        heldout = {str(e.image_id) for e in self.entries if e.split != "train"}
        key = self.spec.vg_key
        self.excluded = vg.heldout_images(self.vg_images, key, heldout)
        log(
            f"Visual Genome: excluded {len(self.excluded)} of {len(self.vg_images)} images that are {cfg.dataset} "
            + (
                f"val/test images (by {key})"
                if key
                else "val/test images (no image_data.json key names them)"
            )
        )
        excluded = set(self.excluded)
        for name, record in sorted(self.others.items()):
            theirs = set(record.get("excluded_vg_ids", []))
            log(
                f"Visual Genome: VG/ also serves {name}: its {len(theirs)} excluded images stay excluded and its "
                f"{len(record.get('words', []))} object words are kept"
            )
            excluded |= theirs
        with self.progress(len(self.vg_images), "VG objects") as bar:
            self.vg_choice, counts = vg.select_candidates(
                cfg.vg_raw / "objects.json",
                self.vg_images,
                excluded,
                cfg.resolution,
                cfg.vg_per_word,
                bar,
            )
        self.counts.update(counts)
        self.counts["vg_images_excluded_heldout"] = len(self.excluded)
        if counts["vg_images_without_image_data"]:
            self.skips.note(
                "VG objects.json images missing from image_data.json (ignored)",
                str(cfg.vg_raw / "objects.json"),
                counts["vg_images_without_image_data"],
            )
        log(f"Visual Genome: {len(self.vg_choice)} vocabulary words with usable objects")
        self.seconds["choose VG"] = time.perf_counter() - t

    # ------------------------------------------------------------------ dataset images
    def _tasks(self) -> Iterator[ItemTask]:
        cfg = self.cfg
        text = TextSettings(cfg.extractor, cfg.spacy_model)
        for e in self.entries:
            sentences = annotation = None
            if self.sentences_dir is not None:
                p = self.sentences_dir / f"{e.stem}.txt"
                if p.is_file():
                    sentences = str(p)
                else:
                    self.skips.skip(
                        "Flickr30k Entities files",
                        f"{p}: sentence file not found (this image's captions use the extractor)",
                    )
            grounding = self.grounding if e.split == "train" else "none"
            if grounding == "gold":
                p = self.annotations_dir / f"{e.stem}.xml"
                if p.is_file():
                    annotation = str(p)
                else:
                    self.skips.skip(
                        "Flickr30k Entities files", f"{p}: box file not found (no gold boxes)"
                    )
                    grounding = "none"
            yield ItemTask(
                e,
                str(cfg.raw / e.file),
                cfg.resolution,
                text,
                sentences,
                annotation,
                tuple(self.detections.get(Path(e.file).name, ())),
                cfg.box_threshold,
                grounding,
            )

    def write_dataset(self, lay: Layout) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        if self.sentences_dir is not None:
            self.skips.total(
                "Flickr30k Entities files",
                len(self.entries) + sum(e.split == "train" for e in self.entries),
            )
        vocab = self.vg_choice
        self.used_words: dict[str, None] = {}
        val: list[dict] = []
        n = {
            "train_images": 0,
            "train_captions": 0,
            "val_images": 0,
            "test_images": 0,
            "test_captions": 0,
            "grounding_images": 0,
        }
        test_index = boxes_seen = 0
        with ExitStack() as stack:
            train_jsonl = _Jsonl(stack, lay.train_jsonl)
            train_npz, val_npz, test_npz = (
                _npz(stack, p) for p in (lay.train_npz, lay.val_npz, lay.test_npz)
            )
            grounding = (
                _Masks(stack, cfg.masks, lay.grounding_boxes, lay.grounding, self.storage)
                if self.grounding != "none"
                else None
            )
            texts, images, segs = (
                _Jsonl(stack, p) for p in (lay.test_texts, lay.test_images, lay.test_segs)
            )
            objects = {s: _Jsonl(stack, lay.objects(s)) for s in ("train", "val", "test")}
            with self.progress(len(self.entries), f"{cfg.dataset} images") as bar:
                for res in ordered_map(prepare_item, self._tasks(), cfg.workers):
                    bar.update(1)
                    _absorb(self.skips, res.outcome)
                    boxes_seen += res.boxes_seen
                    e = res.task.entry
                    if res.error is not None:
                        self.skips.skip("images", res.error)
                        continue
                    objs = image_objects(
                        [s for caption in res.segs for s in caption] + res.labels, vocab
                    )
                    self.used_words.update(dict.fromkeys(objs))
                    objects[e.split].write({"image_id": e.stem, "image_objects": objs})
                    array = self.storage.encode(res.image)
                    if e.split == "train":
                        train_npz.add(str(e.image_id), array)
                        preds = res.preds or [[] for _ in e.captions]
                        for caption, caption_segs, caption_preds in zip(
                            e.captions, res.segs, preds
                        ):
                            train_jsonl.write(
                                {
                                    "image": e.file,
                                    "caption": caption,
                                    "image_id": e.image_id,
                                    "segs": caption_segs,
                                    "preds": caption_preds,
                                }
                            )
                        for label, pixels in res.masks.items():
                            key = grounding_key(e.stem, label)
                            grounding.add(key, e.image_id, res.image, pixels)
                        n["train_images"] += 1
                        n["train_captions"] += len(e.captions)
                        n["grounding_images"] += len(res.masks)
                    elif e.split == "val":
                        val_npz.add(val_image_key(len(val)), array)
                        val.append({"image": e.file, "caption": list(e.captions)})
                    else:
                        test_npz.add(str(e.image_id), array)
                        ids = [caption_query_id(test_index, j) for j in range(len(e.captions))]
                        for q, caption, caption_segs in zip(ids, e.captions, res.segs):
                            texts.write(
                                {"query_id": q, "query_text": caption, "item_ids": [e.image_id]}
                            )
                            segs.write(
                                {"query_id": q, "query_text": caption, "items": caption_segs}
                            )
                        images.write({"image_id": e.image_id, "item_ids": ids})
                        test_index += 1
                        n["test_captions"] += len(e.captions)
            n["val_images"], n["test_images"] = len(val), test_index
        write_json(lay.val_json, val)
        if self.grounding == "gold":
            self.skips.total("boxes", boxes_seen)
        for split in ("train", "val", "test"):
            if not n[f"{split}_images"]:
                raise InputError(
                    f"no usable {split} image in {self.spec.split_path(cfg.raw)}; "
                    "the layout needs all three splits"
                )
        self.counts.update(n)
        self.seconds["dataset images"] = time.perf_counter() - t
        self.seconds["dataset images/s"] = round(
            len(self.entries) / max(self.seconds["dataset images"], 1e-9), 1
        )

    # ------------------------------------------------------------------ Visual Genome images
    def write_vg(self, lay: Layout) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        words = set(self.used_words)
        for record in self.others.values():
            words |= {w for w in record.get("words", []) if w in self.vg_choice}
        self.vg_words = sorted(words)
        words_of: dict[int, list] = {}
        for word in self.vg_words:
            for c in self.vg_choice[word]:
                words_of.setdefault(c.image_id, []).append((word, c.box))
        ids = sorted(words_of)
        self.skips.total("Visual Genome images", len(ids))
        tasks = (
            VgTask(
                g,
                tuple(str(p) for p in vg.image_path(cfg.vg_raw, self.vg_images[g])),
                (self.vg_images[g].width, self.vg_images[g].height),
                tuple(words_of[g]),
                cfg.resolution,
            )
            for g in ids
        )
        usable: dict[str, list[int]] = {}
        names = {(w, c.image_id): c.name for w in self.vg_words for c in self.vg_choice[w]}
        with ExitStack() as stack:
            images = _npz(stack, lay.vg_images)
            masked = _Masks(stack, cfg.masks, lay.vg_mask_boxes, lay.vg_masked, self.storage)
            with self.progress(len(ids), "VG images") as bar:
                res: VgResult
                for res in ordered_map(prepare_vg, tasks, cfg.workers):
                    bar.update(1)
                    _absorb(self.skips, res.outcome)
                    if res.error is not None:
                        self.skips.skip("Visual Genome images", res.error)
                        continue
                    if not res.masks:
                        continue
                    g = res.task.image_id
                    images.add(str(g), self.storage.encode(res.image))
                    for word, pixels in res.masks.items():
                        masked.add(vg_masked_key(word, g), g, res.image, pixels)
                        usable.setdefault(word, []).append(g)
        order = {(w, c.image_id): k for w in self.vg_words for k, c in enumerate(self.vg_choice[w])}
        with atomic_write(lay.vg_vocab) as f:
            for word in sorted(usable):
                entries = sorted(usable[word], key=lambda g: order[(word, g)])
                f.write(
                    dumps(
                        {
                            "vocab": word,
                            "objects": [
                                {"image_id": g, "object": names[(word, g)]} for g in entries
                            ],
                        }
                    )
                )
                f.write(b"\n")
        missing = sorted(set(self.vg_words) - set(usable))
        if missing:
            self.skips.note(
                "object words left without a VG image (their images failed)",
                missing[0],
                len(missing),
            )
        self.counts.update(
            {"vg_words": len(usable), "vg_images": len(images), "vg_masked_images": masked.count}
        )
        self.seconds["VG images"] = time.perf_counter() - t


def prepare(cfg: PrepareConfig) -> PrepareReport:
    """Build the layout of `cfg.dataset` and Visual Genome under `cfg.out` (see the module doc)."""
    cfg.raw, cfg.vg_raw, cfg.out = Path(cfg.raw), Path(cfg.vg_raw), Path(cfg.out)
    cfg.boxes = Path(cfg.boxes) if cfg.boxes is not None else None
    _check_config(cfg)
    final = Layout.under(cfg.out, cfg.dataset)
    report = PrepareReport(final)
    settings, vg_settings = cfg.settings(), cfg.vg_settings()
    data_manifest, vg_manifest = (
        inspect(final.data_dir, cfg.overwrite),
        inspect(final.vg_dir, cfg.overwrite),
    )
    data_done = check_settings(final.data_dir, data_manifest, settings, cfg.overwrite)
    vg_done = check_settings(final.vg_dir, vg_manifest, vg_settings, cfg.overwrite)
    records = dict((vg_manifest or {}).get("datasets", {}))
    if data_done and vg_done and cfg.dataset in records and not cfg.overwrite:
        cfg.log(
            f"{final.data_dir} and {final.vg_dir} are already prepared with these settings: nothing to do "
            "(--overwrite rebuilds them)"
        )
        report.skipped = True
        return report
    run = Preparation(cfg, {k: v for k, v in records.items() if k != cfg.dataset})
    start = time.perf_counter()
    with staging_area(cfg.out) as stage:
        lay = Layout.under(stage, cfg.dataset)
        run.read_inputs()
        run.choose_vg()
        run.write_dataset(lay)
        data_counts = {
            **run.counts,
            **run.skips.as_dict(),
        }  # before VG/, whose content other datasets share
        run.write_vg(lay)
        write_manifest(lay.data_dir, settings, data_counts)
        records = {
            **run.others,
            cfg.dataset: {"excluded_vg_ids": sorted(run.excluded), "words": sorted(run.used_words)},
        }
        write_manifest(
            lay.vg_dir,
            vg_settings,
            {k: run.counts[k] for k in ("vg_words", "vg_images", "vg_masked_images")},
            datasets=dict(sorted(records.items())),
        )
        commit(
            [
                Target(lay.vg_dir, final.vg_dir, "VG"),
                Target(lay.data_dir, final.data_dir, "dataset"),
            ],
            stage,
        )
    run.seconds["total"] = time.perf_counter() - start
    report.counts, report.odd, report.seconds = run.counts, run.skips.as_dict(), run.seconds
    for line in run.skips.summary():
        cfg.log(line)
    c = run.counts
    cfg.log(
        f"wrote {final.data_dir}: {c['train_images']} train images ({c['train_captions']} captions), "
        f"{c['val_images']} val, {c['test_images']} test images ({c['test_captions']} queries), "
        f"{c['grounding_images']} grounding masks ({cfg.masks})"
    )
    cfg.log(
        f"wrote {final.vg_dir}: {c['vg_words']} words, {c['vg_images']} images, {c['vg_masked_images']} masks "
        f"({cfg.masks}); {run.seconds['total']:.1f} s ({run.seconds['dataset images/s']} dataset images/s)"
    )
    return report
