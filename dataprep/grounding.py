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
    """Candidate preds of each caption (label, score) and the boxes of each label, in original pixels."""

    candidates: list[list[tuple[str, float]]]
    boxes: dict[str, list[Box]] = field(default_factory=dict)


def from_gold(caption_segs: Sequence[Sequence[tuple[str, str]]], chain_boxes: dict[str, list[Box]]) -> Grounding:
    """From each caption's (seg, chain id) gold phrases and the boxes of each chain."""
    g = Grounding([])
    for segs in caption_segs:
        preds: dict[str, float] = {}
        for seg, chain in segs:
            boxes = chain_boxes.get(chain)
            if not boxes:
                continue
            label = head_label(seg)
            if not label:
                continue
            preds.setdefault(label, GOLD_SCORE)
            known = g.boxes.setdefault(label, [])
            known += [b for b in boxes if b not in known]
        g.candidates.append(list(preds.items()))
    return g


def mentions(caption: str, label: str) -> bool:
    """Whether `label` occurs in `caption` as whole words, ignoring case and spacing."""
    words = label.split()
    if not words:
        return False
    return re.search(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", caption, re.I) is not None


def from_detections(captions: Sequence[str], detections: Iterable[Detection], threshold: float) -> Grounding:
    """From a detector's boxes of one image (labels already normalised)."""
    best: dict[str, float] = {}
    g = Grounding([])
    for d in detections:
        if d.score < threshold:
            continue
        best[d.label] = max(best.get(d.label, d.score), d.score)
        g.boxes.setdefault(d.label, []).append(d.box)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
    g.candidates = [[(label, s) for label, s in ranked if mentions(c, label)] for c in captions]
    return g


def through_crop(g: Grounding, geometry: Geometry) -> tuple[list[list[dict]], dict[str, list[Box]]]:
    """(preds of each caption as [{label: score}], crop-space boxes of each surviving label)."""
    kept: dict[str, list[Box]] = {}
    for label, boxes in g.boxes.items():
        cropped = [c for c in (geometry.crop_box(b) for b in boxes) if c is not None]
        if cropped:
            kept[label] = cropped
    preds = [[{label: score} for label, score in cands if label in kept] for cands in g.candidates]
    return preds, kept


def masked_labels(preds: Sequence[Sequence[dict]]) -> list[str]:
    """The labels training masks (the grounding_label of each caption's preds), distinct, in order."""
    return list(dict.fromkeys(x for x in (grounding_label(p) for p in preds) if x is not None))

