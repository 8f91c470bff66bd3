"""Grounding: which textual entities of a caption a grounding source located in the image (`preds`), and
the boxes to mask for each label (the images of <dataset>_visual_grounding.<R>.npz).

Label scheme: for Flickr30k Entities' gold phrases a label is the phrase's head word, i.e. its last
word in lower case (`a man's arm` -> `arm`, `Two young guys` -> `guys`), like the GLIP labels of the
release's files (`{"men": 0.62}`); for detector boxes it is the detector's label in lower case with
single spaces. All boxes of a label in one image are masked together (`a man` in one caption and
`the man` in another, if they are different people, are both hidden). Gold phrases score 1.0;
detector scores are kept as given.

- Flickr30k Entities: a caption's preds are its visual phrases whose chain has a box, in order.
- Detector boxes (JSONL): a caption's preds are the image's detections with score >= the threshold
  whose label occurs in the caption (whole words, any case), one entry per label with its highest
  score, highest first (ties by label).
Then the crop rule of dataprep.geometry applies: a label none of whose boxes survives the centre crop
is removed from every caption's preds. Training masks the first label of a caption's preds (other
than "object"); one masked image is written for each such label, key "{stem}_{label}".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from agree.entities import grounding_label
from dataprep.geometry import Box, Geometry

GOLD_SCORE = 1.0


_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def normalise_label(text: str) -> str:
    """Lower case, single spaces."""
    return " ".join(text.lower().split())


def head_label(phrase: str) -> str:
    """The label of a gold phrase: its last word in lower case ('' when it has no word)."""
    words = _WORD.findall(phrase.lower())
    return words[-1] if words else ""


@dataclass(frozen=True)
class Detection:
    """One detector box: label, corners in the original image's pixels, score."""

    label: str
    box: Box
    score: float


@dataclass
class Grounding:
    """Candidate labels of each caption, and the (box, score) pairs of each label in original pixels.

    `ranked`: order each caption's preds by score (detectors) instead of by position (gold phrases).
    """

    candidates: list[list[str]]
    boxes: dict[str, list[tuple[Box, float]]] = field(default_factory=dict)
    ranked: bool = False


def from_gold(
    caption_segs: Sequence[Sequence[tuple[str, str]]], chain_boxes: dict[str, list[Box]]
) -> Grounding:
    """From each caption's (seg, chain id) gold phrases and the boxes of each chain."""
    g = Grounding([])
    for segs in caption_segs:
        labels: dict[str, None] = {}
        for seg, chain in segs:
            boxes = chain_boxes.get(chain)
            label = head_label(seg)
            if not boxes or not label:
                continue
            labels[label] = None
            known = g.boxes.setdefault(label, [])
            known += [(b, GOLD_SCORE) for b in boxes if (b, GOLD_SCORE) not in known]
        g.candidates.append(list(labels))
    return g


def mentions(caption: str, label: str) -> bool:
    """Whether `label` occurs in `caption` as whole words, ignoring case and spacing."""
    words = label.split()
    if not words:
        return False
    return (
        re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", caption, re.I)
        is not None
    )


def from_detections(
    captions: Sequence[str], detections: Iterable[Detection], threshold: float
) -> Grounding:
    """From a detector's boxes of one image (labels already normalised); boxes below `threshold` are ignored."""
    g = Grounding([], ranked=True)
    for d in detections:
        if d.score >= threshold:
            g.boxes.setdefault(d.label, []).append((d.box, d.score))
    g.candidates = [[label for label in g.boxes if mentions(c, label)] for c in captions]
    return g


def through_crop(g: Grounding, geometry: Geometry) -> tuple[list[list[dict]], dict[str, list[Box]]]:
    """(preds of each caption as [{label: score}], crop-space boxes of each surviving label).

    A label's score is the highest score among its boxes that survive the crop."""
    kept: dict[str, list[Box]] = {}
    score: dict[str, float] = {}
    for label, pairs in g.boxes.items():
        for box, s in pairs:
            c = geometry.crop_box(box)
            if c is not None:
                kept.setdefault(label, []).append(c)
                score[label] = max(score.get(label, s), s)
    preds = []
    for labels in g.candidates:
        alive = [label for label in labels if label in kept]
        if g.ranked:
            alive.sort(key=lambda label: (-score[label], label))
        preds.append([{label: score[label]} for label in alive])
    return preds, kept


def masked_labels(preds: Sequence[Sequence[dict]]) -> list[str]:
    """The labels training masks (the grounding_label of each caption's preds), distinct, in order."""
    return list(dict.fromkeys(x for x in (grounding_label(p) for p in preds) if x is not None))
