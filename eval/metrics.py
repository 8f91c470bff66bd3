"""Recall@K of ranked lists against ground truth, and the evaluation record (spec section 4.5)."""
from __future__ import annotations

from typing import Any

from agree.io import InputError
from eval.predictions import RankedLists

KS = (1, 5, 10)


def recall(gt: RankedLists, pred: RankedLists, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Percent of ground-truth queries with a gold item in the first K predictions, for each K, plus their mean."""
    hits = [0] * len(ks)
    for qid, gold, line in zip(gt.ids, gt.items, gt.lines):
        ranked = pred.get(qid)
        if ranked is None:
            raise InputError(f"{pred.path}: no prediction for {gt.key} {qid!r} ({gt.path}:{line})")
        gold_set = {str(x) for x in gold}
        first = next((r for r, x in enumerate(ranked) if str(x) in gold_set), None)
        if first is not None:
            for j, k in enumerate(ks):
                if first < k:
                    hits[j] += 1
    n = len(gt.ids)
    # fractions first, percent last (not 100 * hits / n): bit-identical to the release's floats
    fractions = [h / n for h in hits]
    out = {f"r{k}": f * 100 for k, f in zip(ks, fractions)}
    out["mean"] = sum(fractions) / len(fractions) * 100
    return out


def recall_list(r: dict[str, float]) -> list[float]:
    """`[mean, R@1, R@5, R@10]`, as the TBR script prints it."""
    return [r["mean"], r["r1"], r["r5"], r["r10"]]


def success_record(r: dict[str, float]) -> dict[str, Any]:
    """evaluation.py's record for a successful run."""
    m = r["mean"]
    return {"success": True, "score": m, "scoreJson": {"score": m, "mean_recall": m, "r1": r["r1"], "r5": r["r5"], "r10": r["r10"]}}


def failure_record(message: str, detail: str) -> dict[str, Any]:
    """evaluation.py's record for a failed run."""
    return {"success": False, "score": 0, "scoreJson": {}, "errorMsg": message, "errorDetail": detail}
