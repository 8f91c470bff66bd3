"""Retrieval metrics, one owner: recall at K from the rank of the first correct item, RSUM, the row schema.

Validation (`training/validation.py`), evaluation (`eval/metrics.py`, `eval/evaluation.py`), the demo
and the table runner (`experiments/`) all count recall here:

* a query's *first-gold rank* is the 0-based position of its first correct item in its ranked list,
  or None / any value >= `ABSENT` when no correct item is listed;
* R@K = percent of queries whose first-gold rank is < K, for K in `KS`;
* a table row is `{"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "rsum"}` (percent),
  T2I = text query retrieves images, I2T = image query retrieves texts; RSUM is the sum of the six.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

KS = (1, 5, 10)
DIRECTIONS = ("t2i", "i2t")
RECALL_KEYS = tuple(f"{d}_r{k}" for d in DIRECTIONS for k in KS)  # the six recalls of a row
ROW_KEYS = RECALL_KEYS + ("rsum",)
ABSENT = 10**9  # first-gold rank of a query none of whose correct items is listed

Ranks = Union[Sequence[Optional[int]], np.ndarray]


def as_rank_array(first_ranks: Ranks) -> np.ndarray:
    """First-gold ranks as an int64 array, None -> ABSENT."""
    if isinstance(first_ranks, np.ndarray):
        return first_ranks.astype(np.int64, copy=False)
    return np.array([ABSENT if r is None else int(r) for r in first_ranks], dtype=np.int64)


def recall_at_k(first_ranks: Ranks, ks: Sequence[int] = KS) -> dict[str, float]:
    """{"r1": .., "r5": .., "r10": .., "mean": ..} in percent for these first-gold ranks.

    The arithmetic is hits / n first, times 100 last (not 100 * hits / n), and the mean is taken over
    the fractions: bit-identical to the released evaluation script's floats.
    """
    ranks = as_rank_array(first_ranks)
    n = len(ranks)
    if n == 0:
        raise ValueError("recall of no queries")
    fractions = [int((ranks < k).sum()) / n for k in ks]
    out = {f"r{k}": f * 100 for k, f in zip(ks, fractions)}
    out["mean"] = sum(fractions) / len(fractions) * 100
    return out


def rsum(row: Mapping[str, float]) -> float:
    """Sum of a row's six recalls."""
    return float(sum(row[k] for k in RECALL_KEYS))


def retrieval_row(t2i: Mapping[str, float], i2t: Mapping[str, float]) -> dict[str, float]:
    """The table row from each direction's recalls ({"r1", "r5", "r10"}, percent)."""
    row = {f"{d}_r{k}": float(r[f"r{k}"]) for d, r in (("t2i", t2i), ("i2t", i2t)) for k in KS}
    row["rsum"] = rsum(row)
    return row


def row_from_ranks(t2i_ranks: Ranks, i2t_ranks: Ranks) -> dict[str, float]:
    """The table row from each direction's first-gold ranks."""
    return retrieval_row(recall_at_k(t2i_ranks), recall_at_k(i2t_ranks))


def hits(first_ranks: Ranks, ks: Iterable[int] = KS) -> np.ndarray:
    """[n queries, len(ks)] booleans: is the first correct item within the top K."""
    ranks = as_rank_array(first_ranks)
    return np.stack([ranks < k for k in ks], axis=1)
