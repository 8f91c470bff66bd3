"""Test-set folds: retrieval within each of N parts of the test set (MSCOCO's 1k-fold protocol).

Fold f holds the images at positions [f n_I / N, (f + 1) n_I / N) of the image feature file and the
captions at positions [f n_T / N, (f + 1) n_T / N) of the caption feature file (sizes differ by at
most one when N does not divide them). Karpathy's MSCOCO 5k test split, listed image by image with
its 5 captions, is thus 5 folds of 1,000 images and their 5,000 captions. Each query is ranked
against its own fold's items only, and its prediction record says which fold: `"fold": f`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from agree.io import InputError
from eval.feature_io import Features

Rows = list[tuple]  # (query id, items) or (query id, items, fold)


def fold_bounds(n: int, folds: int) -> list[tuple[int, int]]:
    """[start, stop) of each fold of n positions."""
    return [(f * n // folds, (f + 1) * n // folds) for f in range(folds)]


def check_folds(folds: int, *sets: Features) -> None:
    """--folds must be at least 1 and leave at least one row of every feature file in each fold."""
    if folds < 1:
        raise InputError(f"--folds must be at least 1, got {folds}")
    for feats in sets:
        if len(feats) < folds:
            raise InputError(f"--folds {folds}: {feats.path} has only {len(feats)} rows")


def rows_of(feats: Features, start: int, stop: int) -> Features:
    """Rows [start, stop) of a feature set (a view of its matrix)."""
    n_real = None if feats.n_real is None else feats.n_real[start:stop]
    return replace(feats, ids=feats.ids[start:stop], data=feats.data[start:stop], n_real=n_real)


def split_folds(
    folds: int, text: Features, image: Features, *per_text: Features
) -> Iterator[tuple]:
    """For each fold f: (f, its texts, its images, its rows of each `per_text` set (aligned with text))."""
    check_folds(folds, text, image)
    for f, ((t0, t1), (i0, i1)) in enumerate(
        zip(fold_bounds(len(text), folds), fold_bounds(len(image), folds))
    ):
        yield (
            f,
            rows_of(text, t0, t1),
            rows_of(image, i0, i1),
            *(rows_of(s, t0, t1) for s in per_text),
        )


def tag_fold(rows: list[tuple], fold: int, folds: int) -> Rows:
    """Rows with their fold number appended, when there are several folds (else unchanged)."""
    return rows if folds == 1 else [(qid, items, fold) for qid, items in rows]
