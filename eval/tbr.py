"""Text-image bidirectional re-ranking, TBR (spec section 4.4)."""
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


def tbr_rerank(forward: RankedLists, backward: RankedLists) -> list[tuple[object, list]]:
    """Re-rank every forward list with the other direction's lists; rows follow `forward`."""
    back = back_positions(backward)
    out = []
    for qid, items, line in zip(forward.ids, forward.items, forward.lines):
        q = str(qid)
        pos_lists = []
        for x in items:
            b = back.get(str(x))
            if b is None:
                raise InputError(
                    f"{forward.path}:{line}: predicted id {x!r} has no list in {backward.path}"
                )
            pos_lists.append(b)
        if not items or pos_lists[0].get(q) == 0:  # q is the top answer of its own top item: keep
            out.append((qid, list(items)))
            continue
        score = [(r + b.get(q, ABSENT_RANK)) / 2 for r, b in enumerate(pos_lists)]
        order = sorted(range(len(items)), key=score.__getitem__)  # stable: ties keep forward order
        out.append((qid, [items[i] for i in order]))
    return out
