"""The job of scripts/ground_entities.py: ground every training caption's textual entities in its image with
an open-vocabulary detector and write the --boxes JSONL that prepare_data.py reads (dataprep.boxes):

    {"image": "<file name>", "label": "<phrase>", "box": [x0, y0, x1, y1], "score": s}

Images are the training images of the split file (train and COCO's restval), in its order. An
image's phrases are the textual entities of all its captions, chosen exactly as prepare_data.py
chooses them (dataprep.item.caption_segs: the gold Flickr30k Entities phrases when the dataset has
them and they are downloaded, else the TextBlob extractor), in lower case with single spaces and
without repeats; each phrase is a label, which prepare_data.py matches to every caption that
contains it as whole words. Boxes are in the pixels of the image as displayed (EXIF orientation
applied, as prepare_data.py reads images). Worker processes decode the images and extract the
phrases; the detector runs in this process, --batch-size images per forward pass.

Resumable (dataprep.resumable): the output is written batch by batch to OUT.partial with a progress
record in OUT.progress; a re-run after a kill continues after the last finished batch, and OUT
appears (renamed) when every image is done. An unreadable image gets no boxes (counted, reported):
prepare_data.py applies its own --max-missing-fraction to it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from agree.io import InputError, dumps
from dataprep import datasets, karpathy
from dataprep.detector import DETECTORS, check_folder, default_threshold, load_detector
from dataprep.grounding import normalise_label
from dataprep.images import ImageReadError, decode
from dataprep.item import Outcome, TextSettings, caption_segs
from dataprep.karpathy import ImageEntry
from dataprep.parallel import ordered_map
from dataprep.resumable import ResumableJsonl
from dataprep.skips import SkipLog
from dataprep.textual import get_extractor, unique

SHOWN = 3  # unreadable images named in the log; the rest are counted


def default_workers() -> int:
    """Processes that decode images and extract phrases: all cores but the one feeding the detector, at most 8."""
    return max(1, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class GroundConfig:
    """Inputs and settings of one run (the flags of scripts/ground_entities.py)."""

    dataset: str
    raw: Path
    detector: str
    detector_path: Path
    out: Path
    device: str = "cpu"
    batch_size: int = 8
    box_threshold: Optional[float] = None  # None: the detector's usual threshold
    workers: int = field(default_factory=default_workers)
    progress: bool = True
    log: Callable[[str], None] = print


@dataclass
class GroundReport:
    """What a run did (this run only; `resumed_at` images were done by an earlier one)."""

    out: Path
    images: int = 0
    resumed_at: int = 0
    boxes: int = 0
    unreadable: int = 0
    without_phrases: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class PhraseTask:
    """One training image: where it is and where its gold phrases are (None: the extractor's)."""

    entry: ImageEntry
    image_path: str
    sentences_path: Optional[str]
    text: TextSettings


@dataclass
class PhraseItem:
    """The decoded image (None when unreadable) and its distinct phrases."""

    task: PhraseTask
    image: Optional[np.ndarray]
    phrases: list[str]
    error: Optional[str] = None


def load_item(task: PhraseTask) -> PhraseItem:
    """Decode an image as displayed (RGB) and list the phrases of its captions (runs in a worker)."""
    segs, _ = caption_segs(task.entry, task.sentences_path, task.text, Outcome())
    phrases = unique(normalise_label(s) for caption in segs for s in caption)
    try:
        image = np.array(decode(task.image_path).image.convert("RGB"))
    except (ImageReadError, OSError, ValueError) as e:
        return PhraseItem(
            task, None, phrases, str(e) if task.image_path in str(e) else f"{task.image_path}: {e}"
        )
    return PhraseItem(task, image, phrases)


def _check(cfg: GroundConfig) -> datasets.Dataset:
    spec = datasets.get_dataset(cfg.dataset)
    datasets.check_raw(spec, cfg.raw)
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise InputError(f"workers must be >= 0, got {cfg.workers}")
    check_folder(cfg.detector, cfg.detector_path)
    if cfg.out.is_dir():
        raise InputError(f"--out: {cfg.out} is a folder; give the path of the JSONL file to write")
    return spec


def settings(cfg: GroundConfig, threshold: float) -> dict:
    """What the output depends on (recorded in OUT.progress; a re-run with other settings is refused)."""
    return {
        "dataset": cfg.dataset,
        "raw": str(cfg.raw.resolve()),
        "detector": cfg.detector,
        "detector_path": str(cfg.detector_path.resolve()),
        "box_threshold": threshold,
        "extractor": TextSettings().extractor,
    }


def _batches(items: Iterator[PhraseItem], size: int) -> Iterator[list[PhraseItem]]:
    batch: list[PhraseItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def ground(cfg: GroundConfig) -> GroundReport:
    """Write (or continue writing) cfg.out; see the module doc."""
    cfg.raw, cfg.detector_path, cfg.out = Path(cfg.raw), Path(cfg.detector_path), Path(cfg.out)
    if cfg.detector not in DETECTORS:
        raise InputError(
            f"--detector: unknown detector {cfg.detector!r} (choose from {', '.join(DETECTORS)})"
        )
    threshold = default_threshold(cfg.detector, cfg.box_threshold)
    spec = _check(cfg)
    start = time.perf_counter()
    split_file = spec.split_path(cfg.raw)
    entries = [
        e
        for e in karpathy.read_split_file(split_file, spec, SkipLog(1.0, cfg.log))
        if e.split == "train"
    ]
    if not entries:
        raise InputError(f"{split_file}: no training image")
    names = [Path(e.file).name for e in entries]
    report = GroundReport(cfg.out)
    with ResumableJsonl(cfg.out, settings(cfg, threshold), names) as out:
        report.resumed_at = out.done
        if out.finished:
            cfg.log(f"{cfg.out}: already complete ({len(entries)} training images); nothing to do")
            return report
        if out.done:
            cfg.log(f"{cfg.out}: continuing after {out.done} of {len(entries)} training images")
        text = TextSettings()
        get_extractor(text.extractor)  # a missing extractor stops the run here, not in a worker
        sentences = datasets.sentences_dir(spec, cfg.raw)
        cfg.log(
            f"{split_file}: {len(entries)} training images; phrases: "
            + (f"Flickr30k Entities ({sentences}), else " if sentences else "")
            + text.extractor
        )
        detector = load_detector(cfg.detector, cfg.detector_path, cfg.device)
        cfg.log(
            f"{cfg.detector} from {cfg.detector_path} on {cfg.device}; box threshold {threshold:g}"
        )

        def tasks() -> Iterator[PhraseTask]:
            for e in entries[out.done :]:
                p = sentences / f"{e.stem}.txt" if sentences is not None else None
                yield PhraseTask(
                    e, str(cfg.raw / e.file), str(p) if p and p.is_file() else None, text
                )

        bar = tqdm(
            total=len(entries),
            initial=out.done,
            desc=f"{cfg.dataset} training images",
            unit="img",
            disable=not cfg.progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        with bar:
            for batch in _batches(ordered_map(load_item, tasks(), cfg.workers), cfg.batch_size):
                readable = [it for it in batch if it.image is not None]
                try:
                    found = detector.detect(
                        [it.image for it in readable], [it.phrases for it in readable], threshold
                    )
                except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
                    if "out of memory" not in str(e).lower():
                        raise
                    raise InputError(
                        f"--batch-size {cfg.batch_size}: out of memory on {cfg.device}; run again with "
                        f"a smaller --batch-size: it continues after the last finished batch"
                    ) from None
                dets = dict(zip(map(id, readable), found))
                lines = []
                for it in batch:
                    if it.error is not None:
                        report.unreadable += 1
                        if report.unreadable <= SHOWN:
                            cfg.log(f"warning: no boxes for an unreadable image: {it.error}")
                    elif not it.phrases:
                        report.without_phrases += 1
                    name = Path(it.task.entry.file).name
                    for d in dets.get(id(it), []):
                        lines.append(
                            dumps(
                                {
                                    "image": name,
                                    "label": d.label,
                                    "box": list(d.box),
                                    "score": d.score,
                                }
                            )
                            + b"\n"
                        )
                out.append(lines, len(batch))
                report.images += len(batch)
                report.boxes += len(lines)
                bar.update(len(batch))
        out.finish()
    report.seconds = time.perf_counter() - start
    cfg.log(
        f"wrote {cfg.out}: {report.boxes} boxes for {report.images} training images in this run "
        f"({report.images / max(report.seconds, 1e-9):.1f} images/s)"
        + (f"; {report.unreadable} unreadable images got none" if report.unreadable else "")
        + (
            f"; {report.without_phrases} images had no textual entity"
            if report.without_phrases
            else ""
        )
    )
    return report
