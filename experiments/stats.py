"""Arithmetic of the demo's report: mean and sd over seeds, paired differences, the test set's sampling error."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from agree.metrics import KS, ROW_KEYS, hits


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the sd of a single value is 0."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_sd of no values")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def summarise_seeds(
    per_seed: Sequence[Mapping[str, float]], keys: Sequence[str] = ROW_KEYS
) -> tuple[dict, dict]:
    """{key: mean} and {key: sd} over the per-seed records."""
    mean, sd = {}, {}
    for k in keys:
        mean[k], sd[k] = mean_sd([r[k] for r in per_seed])
    return mean, sd


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float, int]:
    """Mean and sd over the seeds both have of a[seed] - b[seed], and the number of such seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed in common")
    m, s = mean_sd([a[k] - b[k] for k in seeds])
    return m, s, len(seeds)


def verdict(mean: float, sd: float, n: int, what: str = "AGREE - global-only") -> str:
    """One plain sentence: is the paired difference outside twice its standard error over seeds?"""
    if n < 2:
        return f"{what}: {mean:+.2f} RSUM on one seed; no spread, so no claim."
    se = sd / math.sqrt(n)
    side = "above" if mean > 0 else "below"
    if abs(mean) > 2 * se:
        return (
            f"{what}: {mean:+.2f} ± {sd:.2f} RSUM (mean ± sd over {n} paired seeds) is {side} noise "
            f"(|mean| > 2 standard errors = {2 * se:.2f})."
        )
    return (
        f"{what}: {mean:+.2f} ± {sd:.2f} RSUM (mean ± sd over {n} paired seeds) is within noise "
        f"(|mean| <= 2 standard errors = {2 * se:.2f})."
    )


def bootstrap_rsum_se(
    t2i_ranks: np.ndarray,
    i2t_ranks: np.ndarray,
    caps_per_image: int,
    draws: int = 200,
    seed: int = 0,
) -> float:
    """Standard error of RSUM from resampling test images (each with its captions) with replacement.

    `t2i_ranks` [n_images * caps_per_image] (caption j of image i at i * caps_per_image + j) and
    `i2t_ranks` [n_images]: rank of the first correct item (agree.metrics' first-gold ranks).
    The gallery stays fixed; only which queries are counted is resampled.
    """
    per_image = per_image_rsum(t2i_ranks, i2t_ranks, caps_per_image)
    idx = np.random.default_rng(seed).integers(0, len(per_image), size=(draws, len(per_image)))
    return float(per_image[idx].mean(1).std(ddof=1))


def per_image_rsum(t2i_ranks: np.ndarray, i2t_ranks: np.ndarray, caps_per_image: int) -> np.ndarray:
    """[n_images] each test image's contribution to RSUM, times n (its mean is the RSUM); ranks laid out
    as in bootstrap_rsum_se."""
    n = len(i2t_ranks)
    if len(t2i_ranks) != n * caps_per_image:
        raise ValueError(
            f"{len(t2i_ranks)} caption ranks for {n} images x {caps_per_image} captions"
        )
    t_hits = hits(t2i_ranks).reshape(n, caps_per_image, len(KS)).mean(1)  # [n, K]
    i_hits = hits(i2t_ranks).astype(np.float64)  # [n, K]
    return 100 * (t_hits.sum(1) + i_hits.sum(1))


def paired_bootstrap_rsum(
    a: tuple[np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray],
    caps_per_image: int,
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """RSUM(a) - RSUM(b) of two models on the same test images, with a percentile interval from resampling
    the images with replacement, the same resamples for both (paired). `a`, `b`: (T2I ranks, I2T ranks) as in
    bootstrap_rsum_se. Returns {"diff", "low", "high", "se", "level", "draws"}."""
    pa, pb = per_image_rsum(*a, caps_per_image), per_image_rsum(*b, caps_per_image)
    if len(pa) != len(pb):
        raise ValueError(f"{len(pa)} and {len(pb)} test images: not the same test set")
    delta = pa - pb
    idx = np.random.default_rng(seed).integers(0, len(delta), size=(draws, len(delta)))
    boot = delta[idx].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return {
        "diff": float(delta.mean()),
        "low": float(low),
        "high": float(high),
        "se": float(boot.std(ddof=1)),
        "level": level,
        "draws": draws,
    }


def duplicate_rows(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    """(section, method) pairs that occur more than once."""
    seen: set[tuple[str, str]] = set()
    dups = []
    for r in rows:
        key = (r["section"], r["method"])
        if key in seen:
            dups.append(key)
        seen.add(key)
    return dups
