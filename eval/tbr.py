"""Text-image bidirectional re-ranking, TBR (docs/method.md §5.4)."""

from __future__ import annotations

from agree.io import InputError
from eval.predictions import RankedLists

ABSENT_RANK = 10000  # backward rank of a query missing from an item's backward list


def back_positions(backward: RankedLists) -> dict[str, dict[str, int]]:
    """For each backward query (string id): item (string id) -> first position in its list."""
    out: dict[str, dict[str, int]] = {}
    for qid, items in zip(backward.ids, backward.items):
        pos: dict[str, int] = {}
        for r, x in enumerate(items):
            pos.setdefault(str(x), r)
        out[str(qid)] = pos
    return out


def tbr_rerank(forward: RankedLists, backward: RankedLists) -> list[tuple]:
    """Re-rank every forward list with the other direction's lists; rows follow `forward`.

    Rows are `(query id, items)`, or `(query id, items, fold)` when the lists record test folds
    (then every item's backward list must be of the query's fold).
    """
    back = back_positions(backward)
    fold_of = _folds(forward, backward)
    out = []
    for row, (qid, items, line) in enumerate(zip(forward.ids, forward.items, forward.lines)):
        q = str(qid)
        pos_lists = []
        for x in items:
            b = back.get(str(x))
            if b is None:
                raise InputError(
                    f"{forward.path}:{line}: predicted id {x!r} has no list in {backward.path}"
                )
            pos_lists.append(b)
        if fold_of is not None:
            _check_same_fold(forward, backward, fold_of, row, items)
        if not items or pos_lists[0].get(q) == 0:  # q is the top answer of its own top item: keep
            ranked = list(items)
        else:
            score = [(r + b.get(q, ABSENT_RANK)) / 2 for r, b in enumerate(pos_lists)]
            order = sorted(
                range(len(items)), key=score.__getitem__
            )  # stable: ties keep forward order
            ranked = [items[i] for i in order]
        out.append((qid, ranked) if fold_of is None else (qid, ranked, forward.folds[row]))
    return out


def _folds(forward: RankedLists, backward: RankedLists) -> dict[str, int] | None:
    """Backward query (string id) -> fold, when both files record folds; None when neither does."""
    if (forward.folds is None) != (backward.folds is None):
        with_folds, without = (
            (forward, backward) if forward.folds is not None else (backward, forward)
        )
        raise InputError(
            f"{with_folds.path} records test folds and {without.path} does not "
            "(make both directions' predictions with the same --folds)"
        )
    if backward.folds is None:
        return None
    return {str(q): f for q, f in zip(backward.ids, backward.folds)}


def _check_same_fold(
    forward: RankedLists, backward: RankedLists, fold_of: dict[str, int], row: int, items: list
) -> None:
    fold = forward.folds[row]
    for x in items:
        if fold_of[str(x)] != fold:
            raise InputError(
                f"{forward.path}:{forward.lines[row]}: item {x!r} is in fold {fold_of[str(x)]} of "
                f"{backward.path}, the query in fold {fold}"
            )
