"""Recall@K of ranked lists against ground truth, and the evaluation record (docs/method.md §5.5)."""

from __future__ import annotations

from typing import Any

from agree.io import InputError
from agree.metrics import KS, recall_at_k
from eval.predictions import RankedLists


def first_gold_ranks(gt: RankedLists, pred: RankedLists) -> list[int | None]:
    """For each ground-truth query, the first position of a gold item in its predictions (None: absent)."""
    out: list[int | None] = []
    for qid, gold, line in zip(gt.ids, gt.items, gt.lines):
        ranked = pred.get(qid)
        if ranked is None:
            raise InputError(f"{pred.path}: no prediction for {gt.key} {qid!r} ({gt.path}:{line})")
        gold_set = {str(x) for x in gold}
        out.append(next((r for r, x in enumerate(ranked) if str(x) in gold_set), None))
    return out


def recall(gt: RankedLists, pred: RankedLists, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Percent of ground-truth queries with a gold item in the first K predictions, for each K, plus their mean.

    When the predictions record test folds (`--folds` of the top-k scripts), each value is the
    average over the folds of the recall within the fold, and `"folds"` lists the folds' own values.
    """
    firsts = first_gold_ranks(gt, pred)
    if pred.folds is None:
        return recall_at_k(firsts, ks)
    fold_of_query = _query_folds(gt, pred)
    n_folds = max(pred.folds) + 1
    per_fold = []
    for f in range(n_folds):
        mine = [r for r, g in zip(firsts, fold_of_query) if g == f]
        if not mine:
            raise InputError(f"{pred.path}: fold {f} has no query of {gt.path}")
        per_fold.append(dict(recall_at_k(mine, ks), queries=len(mine)))
    out: dict[str, Any] = {
        name: sum(p[name] for p in per_fold) / n_folds for name in [f"r{k}" for k in ks] + ["mean"]
    }
    out["folds"] = per_fold
    return out


def _query_folds(gt: RankedLists, pred: RankedLists) -> list[int]:
    """Each ground-truth query's fold; every gold item predicted anywhere must be predicted in that fold only."""
    item_fold: dict[str, tuple[int, int]] = {}  # item -> (fold, prediction row where first seen)
    for row, (items, fold) in enumerate(zip(pred.items, pred.folds)):
        for x in items:
            seen = item_fold.setdefault(str(x), (fold, row))
            if seen[0] != fold:
                raise InputError(
                    f"{pred.path}:{pred.lines[row]}: item {x!r} is ranked in fold {fold} and in fold "
                    f"{seen[0]} (line {pred.lines[seen[1]]})"
                )
    out = []
    for qid, gold, line in zip(gt.ids, gt.items, gt.lines):
        fold = pred.folds[pred.index[str(qid)]]
        for g in gold:
            other = item_fold.get(str(g))
            if other is not None and other[0] != fold:
                raise InputError(
                    f"{gt.path}:{line}: gold item {g!r} of {gt.key} {qid!r} (fold {fold}) is ranked in fold {other[0]} "
                    f"of {pred.path}: the folds do not follow the ground truth (the feature files must list the "
                    "images and their captions fold by fold)"
                )
        out.append(fold)
    return out


def recall_list(r: dict[str, float]) -> list[float]:
    """`[mean, R@1, R@5, R@10]`, as the TBR script prints it."""
    return [r["mean"], r["r1"], r["r5"], r["r10"]]


def success_record(r: dict[str, Any]) -> dict[str, Any]:
    """evaluation.py's record for a successful run (with the per-fold values when there are folds)."""
    m = r["mean"]
    score = {"score": m, "mean_recall": m, "r1": r["r1"], "r5": r["r5"], "r10": r["r10"]}
    if "folds" in r:
        score["folds"] = [
            {
                "mean_recall": f["mean"],
                "r1": f["r1"],
                "r5": f["r5"],
                "r10": f["r10"],
                "queries": f["queries"],
            }
            for f in r["folds"]
        ]
    return {"success": True, "score": m, "scoreJson": score}


def failure_record(message: str, detail: str) -> dict[str, Any]:
    """evaluation.py's record for a failed run."""
    return {
        "success": False,
        "score": 0,
        "scoreJson": {},
        "errorMsg": message,
        "errorDetail": detail,
    }
