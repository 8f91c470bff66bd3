"""Winoground-style scores of twin pairs (images A, B; captions a, b) from image and text features.

text score:  s(A,a) > s(A,b) and s(B,b) > s(B,a)   (each image picks its own caption)
image score: s(A,a) > s(B,a) and s(B,b) > s(A,b)   (each caption picks its own image)
group score: both.  Ties count as failures, as in Winoground.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from agree.io import InputError, iter_jsonl
from eval.feature_io import Features

PAIR_KEYS = ("kind", "image_a", "image_b", "text_a", "text_b")
SCORES = ("text", "image", "group")


@dataclass
class TwinPairs:
    """Twin pairs as given: kind per pair and the ids of both images and both captions."""

    kinds: list[str]
    image_a: list
    image_b: list
    text_a: list
    text_b: list

    def __len__(self) -> int:
        return len(self.kinds)


def read_twin_pairs(path: str | os.PathLike) -> TwinPairs:
    """Read a pairs JSONL (`kind`, `image_a`, `image_b`, `text_a`, `text_b`); errors name file and line."""
    cols: dict[str, list] = {k: [] for k in PAIR_KEYS}
    for lineno, rec in iter_jsonl(path, required=PAIR_KEYS):
        if not isinstance(rec["kind"], str):
            raise InputError(f"{path}:{lineno}: 'kind' must be a string")
        for k in PAIR_KEYS:
            cols[k].append(rec[k])
    if not cols["kind"]:
        raise InputError(f"{path}: no twin pairs (file is empty)")
    return TwinPairs(cols["kind"], cols["image_a"], cols["image_b"], cols["text_a"], cols["text_b"])


def pair_outcomes(
    s_aa: np.ndarray, s_ab: np.ndarray, s_ba: np.ndarray, s_bb: np.ndarray
) -> dict[str, np.ndarray]:
    """Boolean text/image/group outcome per pair; s_xy = similarity of image X and caption y."""
    text = (s_aa > s_ab) & (s_bb > s_ba)
    image = (s_aa > s_ba) & (s_bb > s_ab)
    return {"text": text, "image": image, "group": text & image}


def _rows(feats: Features, ids: list, what: str, path: object) -> np.ndarray:
    index = {s: i for i, s in enumerate(feats.str_ids())}
    missing = [i for i in ids if str(i) not in index]
    if missing:
        raise InputError(
            f"{path}: {what} id {missing[0]!r} has no feature in {feats.path} "
            f"({len(missing)} missing in all)"
        )
    return np.array([index[str(i)] for i in ids], dtype=np.int64)


def pair_similarities(
    pairs: TwinPairs, images: Features, texts: Features, path: object = ""
) -> tuple[np.ndarray, ...]:
    """(s_aa, s_ab, s_ba, s_bb) for every pair: dot products of the features (cosines for normalised ones)."""
    ia, ib = (
        images.data[_rows(images, ids, "image", path)] for ids in (pairs.image_a, pairs.image_b)
    )
    ta, tb = (texts.data[_rows(texts, ids, "text", path)] for ids in (pairs.text_a, pairs.text_b))
    dot = lambda x, y: np.einsum("nd,nd->n", x.astype(np.float64), y.astype(np.float64))  # noqa: E731
    return dot(ia, ta), dot(ia, tb), dot(ib, ta), dot(ib, tb)


def summarise(outcomes: dict[str, np.ndarray], kinds: list[str]) -> dict[str, dict]:
    """Per kind and over all pairs ("all"): percent of pairs passing each score, its standard error, and n."""
    kinds_arr = np.asarray(kinds)
    out = {}
    for kind in list(dict.fromkeys(kinds)) + ["all"]:
        sel = np.ones(len(kinds_arr), bool) if kind == "all" else kinds_arr == kind
        n = int(sel.sum())
        row: dict = {"n": n}
        for name in SCORES:
            p = float(outcomes[name][sel].mean())
            row[name] = 100 * p
            row[f"{name}_se"] = 100 * math.sqrt(p * (1 - p) / n)
        out[kind] = row
    return out


def score_twins(
    pairs: TwinPairs, images: Features, texts: Features, path: object = ""
) -> dict[str, dict]:
    """Text, image and group scores (percent, with standard errors) per twin kind and over all pairs."""
    return summarise(pair_outcomes(*pair_similarities(pairs, images, texts, path)), pairs.kinds)
