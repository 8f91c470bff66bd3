"""Chunked dot-product scoring and exact top-k selection in bounded memory (numpy on the CPU, torch on CUDA).

Memory never holds the full score matrix: queries are scored a pass at a time (see queries_per_pass)
against blocks of at most `item_chunk` items, and each block's best entries are merged into a
running top-k. Blocks
grow geometrically from a small first one, so that the running k-th score (the "floor") prunes
almost every entry of the later blocks before any sorting (NumpyOps.topk).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from agree.io import InputError
from eval.array_ops import Array, NumpyOps, Ops
from eval.feature_io import Features

ITEM_CHUNK = 16384  # items per block at most
# A pass scores at most chunk x PASS_WIDTH x item_chunk floats (x (1 + extras)): chunk x 65,536 by
# default, i.e. --eval-batch-size x 256 KB. With fewer items than that, more queries share a pass.
PASS_WIDTH = 4
FIRST_BLOCK = 1024  # items of the first block (at least 4 k), doubling up to ITEM_CHUNK
FAISS_QUERIES = 4096  # queries per FAISS search call (FAISS blocks its own score matrix)
SHARED_SCORES_MAX = (
    1 << 25
)  # keep the score matrix for the reverse direction up to this many floats (128 MB)

TopkRows = Iterator[tuple[int, Array, Array, "Array | None"]]


def item_blocks(n_items: int, k: int, item_chunk: int = ITEM_CHUNK) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering n_items: a first block of max(4 k, FIRST_BLOCK), then doubling, capped."""
    size = min(item_chunk, max(4 * k, FIRST_BLOCK))
    start = 0
    while start < n_items:
        stop = min(n_items, start + size)
        yield start, stop
        start, size = stop, min(item_chunk, 2 * size)


def queries_per_pass(chunk: int, n_items: int, item_chunk: int = ITEM_CHUNK) -> int:
    """Queries scored per pass: as many as fit chunk x PASS_WIDTH x item_chunk scores, in blocks of at
    most item_chunk items.

    (Wide blocks of few queries and narrow blocks of many queries cost the same memory; the
    latter make faster matrix products.)
    """
    return chunk * max(1, PASS_WIDTH * item_chunk // min(max(1, n_items), item_chunk))


def running_topk(
    ops: Ops, blocks: Iterator[tuple[int, Array, "Array | None"]], k: int
) -> tuple[Array, Array, "Array | None"]:
    """Top-k of rows given block by block: `blocks` yields (first column, scores [B, n], extras [B, E, n] or None).

    Returns (scores [B, k'], columns [B, k'], extras at those columns [B, k', E] or None), k' = min(k, columns):
    descending, ties by the lower column (blocks come in column order).
    """
    best_s = best_i = best_x = None
    for col0, scores, extras in blocks:
        floor = best_s[:, -1] if best_s is not None and best_s.shape[1] >= k else None
        s, i = ops.topk(scores, k, floor)
        x = (
            ops.take_along(extras, i[:, None, :], axis=2).swapaxes(1, 2)
            if extras is not None
            else None
        )
        i = i + col0
        if best_s is not None:  # earlier columns first: ties still resolve by column
            s, i = ops.concat([best_s, s], 1), ops.concat([best_i, i], 1)
            x = ops.concat([best_x, x], 1) if extras is not None else None
            s, sel = ops.topk(s, k)
            i = ops.take_along(i, sel, axis=1)
            x = ops.take_along(x, sel[..., None], axis=1) if extras is not None else None
        best_s, best_i, best_x = s, i, x
    return best_s, best_i, best_x


def chunked_topk(
    ops: Ops,
    queries: Array,
    items: Array,
    k: int,
    chunk: int,
    extras: Array | None = None,
    item_chunk: int = ITEM_CHUNK,
    scores_out: Array | None = None,
) -> TopkRows:
    """For each chunk of queries yield `(start, scores, indices, extra_scores)`.

    `scores`/`indices` are [B, k]: the k items with the largest dot product, by score descending,
    ties by the lower item index (also at the k-th place). `extras` ([Q, E, D], optional) are more
    query vectors scored against the same items; `extra_scores` [B, k, E] are their dot products
    with the selected items (computed in the same matrix product). Memory is bounded by
    `chunk x PASS_WIDTH x item_chunk x (1 + E)` floats (see queries_per_pass), never by the full
    score matrix, unless `scores_out` ([Q, N], see `shared_scores`) is given to keep it for the
    reverse direction.
    """
    n_q, n_items = queries.shape[0], items.shape[0]
    n_extra = 0 if extras is None else extras.shape[1]
    chunk = queries_per_pass(chunk, n_items, item_chunk)
    for start in range(0, n_q, chunk):
        q = queries[start : start + chunk]
        b = q.shape[0]
        if extras is not None:  # one product for the query and its extra vectors: rows [B, 1 + E]
            q = ops.concat([q[:, None], extras[start : start + chunk]], 1).reshape(
                b * (1 + n_extra), -1
            )

        def blocks(q=q, b=b, start=start):
            for i0, i1 in item_blocks(n_items, k, item_chunk):
                block = (q @ items[i0:i1].T).reshape(b, 1 + n_extra, i1 - i0)
                if scores_out is not None:
                    scores_out[start : start + b, i0:i1] = block[:, 0]
                yield i0, block[:, 0], (block[:, 1:] if n_extra else None)

        s, i, x = running_topk(ops, blocks(), k)
        yield start, s, i, x


def faiss_topk(
    ops: Ops,
    queries: Array,
    items: Array,
    k: int,
    chunk: int,
    extras: Array | None = None,
    item_chunk: int = ITEM_CHUNK,
    scores_out: Array | None = None,
) -> TopkRows:
    """chunked_topk's rows from FAISS's exact inner-product index (IndexFlatIP, the optional faiss-cpu).

    No `extras` or `scores_out` (FAISS returns scores and ids only). Same lists as chunked_topk
    except which of several items tied at the k-th score get in (FAISS's choice, not always the
    lower index); FAISS lists tied items in no fixed order, so rows are re-sorted here to bring
    ties by ascending index, as everywhere else.
    """
    if extras is not None or scores_out is not None:
        raise ValueError("faiss_topk scores no extra vectors and keeps no score matrix")
    if not isinstance(ops, NumpyOps):
        raise InputError("--faiss runs on the CPU (faiss-cpu): use it with --device cpu")
    faiss = import_faiss()
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)  # a copy of the items inside the index
    k = min(k, items.shape[0])
    step = max(chunk, FAISS_QUERIES)
    for start in range(0, queries.shape[0], step):
        s, i = index.search(queries[start : start + step], k)
        order = np.lexsort((i, -s), axis=1)
        yield start, np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1), None


def import_faiss():
    """The faiss module, or an InputError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise InputError(
            "--faiss needs the optional package faiss-cpu: pip install faiss-cpu "
            "(or pip install -e '.[faiss]')"
        ) from None
    return faiss


def first_stage(use_faiss: bool) -> Callable[..., TopkRows]:
    """The exact top-k search: chunked_topk, or faiss_topk with --faiss."""
    return faiss_topk if use_faiss else chunked_topk


def topk_of_scores(
    ops: Ops, scores: Array, k: int, chunk: int, item_chunk: int = ITEM_CHUNK
) -> TopkRows:
    """chunked_topk's output from a kept score matrix (e.g. the transposed one of the other direction)."""
    n_items = scores.shape[1]
    chunk = queries_per_pass(chunk, n_items, item_chunk)
    for start in range(0, scores.shape[0], chunk):
        rows = scores[start : start + chunk]
        blocks = ((i0, rows[:, i0:i1], None) for i0, i1 in item_blocks(n_items, k, item_chunk))
        s, i, _ = running_topk(ops, blocks, k)
        yield start, s, i, None


def shared_scores(ops: Ops, n_queries: int, n_items: int) -> Array | None:
    """A [n_queries, n_items] buffer for `scores_out` when small enough, else None (compute twice)."""
    if n_queries * n_items > SHARED_SCORES_MAX:
        return None
    return ops.empty((n_queries, n_items))


def topk_lists(
    ops: Ops, text: Features, image: Features, k: int, chunk: int, use_faiss: bool = False
) -> tuple[list[tuple[object, list]], list[tuple[object, list]]]:
    """T2I and I2T rows `(query id, [ids of its k best items])`, each in its feature file's order."""
    check_sizes(k=k, chunk=chunk)
    search = first_stage(use_faiss)
    text_a, image_a = ops.asarray(text.data), ops.asarray(image.data)
    kept = None if use_faiss else shared_scores(ops, len(text), len(image))
    t2i = _id_rows(
        ops, text.ids, image.ids, search(ops, text_a, image_a, k, chunk, scores_out=kept)
    )
    tops = (
        topk_of_scores(ops, kept.T, k, chunk)
        if kept is not None
        else search(ops, image_a, text_a, k, chunk)
    )
    return t2i, _id_rows(ops, image.ids, text.ids, tops)


def check_sizes(**sizes: int) -> None:
    """Every size flag (--top-k, --eval-batch-size, --pool-size) must be at least 1."""
    bad = {name: v for name, v in sizes.items() if v < 1}
    if bad:
        flags = {"k": "--top-k", "chunk": "--eval-batch-size", "pool": "--pool-size"}
        raise InputError(
            ", ".join(f"{flags.get(n, n)} must be at least 1 (got {v})" for n, v in bad.items())
        )


def _id_rows(
    ops: Ops, query_ids: list, item_ids: list, tops: TopkRows
) -> list[tuple[object, list]]:
    rows: list[tuple[object, list]] = []
    for start, _, idx, _ in tops:
        for qid, row in zip(query_ids[start : start + len(idx)], ops.to_numpy(idx).tolist()):
            rows.append((qid, [item_ids[i] for i in row]))
    return rows
