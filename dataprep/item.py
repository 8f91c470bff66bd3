"""Everything about one image, computed in a worker process: its R x R array, the segs of its captions,
and for a training image the preds of each caption and the pixel boxes of each masked label. Also one
Visual Genome image and the pixel boxes of each of its words. Odd input comes back as notes and skips,
never as an exception, so the main process counts it against --max-missing-fraction. The main process
writes the boxes (--masks boxes) or the masked copies (--masks images, agree.masks.fill_boxes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from agree.io import InputError
from agree.masks import PixelBox
from dataprep.entities_files import GoldBoxes, read_annotation, read_sentences
from dataprep.geometry import Box, Geometry, clip_to_image, exif_box
from dataprep.grounding import (
    Detection,
    Grounding,
    from_detections,
    from_gold,
    masked_labels,
    through_crop,
)
from dataprep.images import Decoded, ImageReadError, decode, mask_pixels, to_model_input
from dataprep.karpathy import ImageEntry
from dataprep.textual import get_extractor, gold_segs, match_sentence, unique
from dataprep.visual_genome import qualifying_box


@dataclass(frozen=True)
class TextSettings:
    """The extractor for captions without a matching Flickr30k Entities sentence (see dataprep.textual)."""

    extractor: str = "textblob"
    spacy_model: str = "en_core_web_sm"


@dataclass(frozen=True)
class ItemTask:
    """One dataset image to prepare."""

    entry: ImageEntry
    image_path: str
    resolution: int
    text: TextSettings
    sentences_path: Optional[str] = None  # Flickr30k Entities Sentences/<stem>.txt
    annotation_path: Optional[str] = None  # Flickr30k Entities Annotations/<stem>.xml (train only)
    detections: tuple[Detection, ...] = ()  # --boxes of this image (all scores)
    box_threshold: float = 0.5
    grounding: str = "none"  # none | gold | boxes (train only)


@dataclass
class Outcome:
    """What was odd: skips (kind, message) count against the budget; notes (kind, message) are only reported."""

    skips: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ItemResult:
    """The prepared image, or `error` when it cannot be used (the image is then skipped)."""

    task: ItemTask
    outcome: Outcome
    error: Optional[str] = None
    image: Optional[np.ndarray] = None  # uint8 (R, R, 3); the main process encodes it for storage
    segs: list[list[str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # detector labels >= threshold (for objects)
    preds: list[list[dict]] = field(default_factory=list)
    masks: dict[str, list[PixelBox]] = field(
        default_factory=dict
    )  # masked label -> its pixel boxes
    boxes_seen: int = 0  # grounding boxes looked at (the base of the "boxes" skip budget)


def _decode_notes(d: Decoded, path: str, out: Outcome) -> None:
    if d.orientation != 1:
        out.notes.append(
            ("EXIF-rotated images (shown upright)", f"{path} (orientation {d.orientation})")
        )
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("jpg", "jpeg") and d.format != "JPEG" or suffix == "png" and d.format != "PNG":
        out.notes.append(
            (
                "images whose content is not what the file name says (read by content)",
                f"{path} ({d.format})",
            )
        )
    if d.mode not in ("RGB",):
        out.notes.append(("images converted to RGB", f"{path} ({d.mode})"))


def _segs(task: ItemTask, out: Outcome) -> tuple[list[list[str]], list[list[tuple[str, str]]]]:
    return caption_segs(task.entry, task.sentences_path, task.text, out)


def caption_segs(
    entry: ImageEntry, sentences_path: Optional[str], text: TextSettings, out: Outcome
) -> tuple[list[list[str]], list[list[tuple[str, str]]]]:
    """Segs of each caption (gold phrases from `sentences_path` when a sentence matches, else the
    extractor), and the gold (seg, chain) phrases of each caption ([] without gold)."""
    sentences = None
    if sentences_path is not None:
        try:
            sentences = read_sentences(Path(sentences_path))
        except InputError as e:
            out.skips.append(("Flickr30k Entities files", str(e)))
    segs, gold = [], []
    for i, caption in enumerate(entry.captions):
        sentence = match_sentence(caption, i, sentences) if sentences else None
        if sentences and sentence is None:
            out.notes.append(
                (
                    "captions without a matching Entities sentence (extractor used)",
                    f"{sentences_path}: {caption!r}",
                )
            )
        phrases = gold_segs(caption, sentence) if sentence is not None else []
        if sentence is not None:
            found = unique(s for s, _ in phrases)
        else:
            found = get_extractor(text.extractor, text.spacy_model)(caption)
        if not found:
            out.notes.append(("captions without any textual entity", f"{entry.file}: {caption!r}"))
        segs.append(found)
        gold.append(phrases)
    return segs, gold


def _gold_boxes(task: ItemTask, d: Decoded, out: Outcome) -> dict[str, list[Box]]:
    try:
        ann: GoldBoxes = read_annotation(Path(task.annotation_path))
    except InputError as e:
        out.skips.append(("Flickr30k Entities files", str(e)))
        return {}
    w, h = d.image.size
    ref = (ann.width, ann.height)

    def displayed(box: Box) -> Box:
        if ann.width is None or ref == (w, h):
            return box
        if d.orientation != 1 and ref == d.stored_size:
            return exif_box(box, d.orientation, *d.stored_size)
        sx, sy = w / ann.width, h / ann.height  # a rescaled copy of the annotated image
        return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy

    if ann.width is not None and ref not in ((w, h), d.stored_size):
        out.notes.append(
            (
                "Entities boxes rescaled to the image's size",
                f"{task.annotation_path}: annotated {ref[0]}x{ref[1]}, image {w}x{h}",
            )
        )
    return {chain: [displayed(b) for b in boxes] for chain, boxes in ann.boxes.items()}


def _inside(g: Grounding, size: tuple[int, int], where: str, out: Outcome) -> Grounding:
    """Boxes clipped to the image; boxes with nothing inside are skipped (counted)."""
    w, h = size
    for label, pairs in list(g.boxes.items()):
        kept = []
        for box, score in pairs:
            c = clip_to_image(box, w, h)
            if c is None:
                out.skips.append(
                    (
                        "boxes",
                        f"{where}: box {tuple(round(v, 1) for v in box)} of {label!r} lies "
                        f"outside the {w}x{h} image",
                    )
                )
                continue
            if c != box:
                out.notes.append(("boxes clipped to their image", f"{where}: {label!r}"))
            kept.append((c, score))
        g.boxes[label] = kept
    return g


def prepare_item(task: ItemTask) -> ItemResult:
    """Decode, transform and annotate one dataset image (see the module doc)."""
    out = Outcome()
    res = ItemResult(task, out)
    try:
        d = decode(task.image_path)
        res.image = to_model_input(d.image, task.resolution)
    except ImageReadError as e:
        res.error = str(e) if task.image_path in str(e) else f"{task.image_path}: {e}"
        return res
    _decode_notes(d, task.image_path, out)
    segs, gold = _segs(task, out)
    res.segs = segs
    res.labels = unique(x.label for x in task.detections if x.score >= task.box_threshold)
    if task.grounding == "none":
        return res
    if task.grounding == "gold":
        where = task.annotation_path
        g = from_gold(gold, _gold_boxes(task, d, out))
    else:
        where = f"--boxes ({task.entry.file})"
        g = from_detections(task.entry.captions, task.detections, task.box_threshold)
    res.boxes_seen = sum(len(b) for b in g.boxes.values())
    g = _inside(g, d.image.size, where, out)
    geometry = Geometry(d.image.width, d.image.height, task.resolution)
    res.preds, crop_boxes = through_crop(g, geometry)
    dropped = [label for label in g.boxes if g.boxes[label] and label not in crop_boxes]
    for label in dropped:
        out.notes.append(
            ("grounded labels dropped by the centre crop", f"{task.entry.file}: {label!r}")
        )
    for label in masked_labels(res.preds):
        res.masks[label] = mask_pixels(crop_boxes[label], task.resolution)
    return res


# --------------------------------------------------------------------------- Visual Genome
@dataclass(frozen=True)
class VgTask:
    """One VG image and the (word, box) pairs to mask, boxes in image_data's pixel size."""

    image_id: int
    paths: tuple[str, ...]
    size: tuple[int, int]
    words: tuple[tuple[str, Box], ...]
    resolution: int


@dataclass
class VgResult:
    """The VG image and the pixel boxes of each word (words whose box fails on the real image are left out)."""

    task: VgTask
    outcome: Outcome
    error: Optional[str] = None
    image: Optional[np.ndarray] = None
    masks: dict[str, list[PixelBox]] = field(default_factory=dict)


def prepare_vg(task: VgTask) -> VgResult:
    """Decode and transform one VG image; the pixels to mask for each of its words."""
    out = Outcome()
    res = VgResult(task, out)
    path = next((p for p in task.paths if Path(p).is_file()), None)
    if path is None:
        res.error = f"{' or '.join(task.paths)}: Visual Genome image file not found"
        return res
    try:
        d = decode(path)
        image = to_model_input(d.image, task.resolution)
    except ImageReadError as e:
        res.error = str(e)
        return res
    _decode_notes(d, path, out)
    w, h = d.image.size
    sx, sy = w / task.size[0], h / task.size[1]
    if (w, h) != task.size:
        out.notes.append(
            (
                "VG images whose size differs from image_data.json (boxes rescaled)",
                f"{path}: {w}x{h}, image_data {task.size[0]}x{task.size[1]}",
            )
        )
    g = Geometry(w, h, task.resolution)
    for word, box in task.words:
        b = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        if not qualifying_box(g, b):
            out.notes.append(
                ("VG objects dropped (box unusable on the real image)", f"{path}: {word!r}")
            )
            continue
        res.masks[word] = mask_pixels([g.crop_box(b)], task.resolution)
    res.image = image
    return res
