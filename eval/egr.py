"""Entity-guided re-ranking, EGR (docs/method.md §5.3), as batched array operations (numpy or torch).

Notation: `s` = query-item dot product, `p_j` / `m_j` = dot product of the item
image with prompt / masked-caption slot j of the text. Slots are weighted by
`w_j` in {0, 1}: all ones reproduce the release (pads included); with
`real_only` the "" pad slots get weight 0.

- T2I: a = 0.9 s + 0.1 sum_j w_j (s - m_j),  b = 0.99 a + 0.01 mean_j p_j
- I2T: a = 0.8 s + 0.2 mean_j p_j,           b = 0.98 a + 0.02 sum_j w_j min(0, s - m_j)

(mean_j over the weighted slots; a text with no weighted slot uses s in place
of the prompt mean, i.e. no evidence either way.) Candidates are the `pool`
items with the largest s (ties: lower item index); they are ordered by a then
by b (stable sorts, descending) and the first `top_k` kept. Only the candidates
are re-scored, so the cost beyond the first-stage top-k is O(queries x pool).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from agree.io import InputError
from eval.array_ops import Array, Ops
from eval.feature_io import Features
from eval.topk import (
    TopkRows,
    check_sizes,
    chunked_topk,
    first_stage,
    shared_scores,
    topk_of_scores,
)

POOL = 128  # candidates re-ranked per query (release value)
PAIR_BLOCK = 1 << 21  # floats per gathered block in pair_slot_dots (8 MB in float32: cache-sized)
# T2I slot sums are scored against every item (one product with s) up to this many items per
# candidate, beyond it against the candidates only (gathers): the two cost the same near 14 (measured)
EXTRAS_IN_PRODUCT = 16


@dataclass
class Ranked:
    """Re-ranked lists of one direction: item rows and their s, a, b (float64), [Q, k] each."""

    index: np.ndarray
    s: np.ndarray
    a: np.ndarray
    b: np.ndarray


def slot_weights(
    n_slots: int, n_rows: int, n_real: np.ndarray | None, real_only: bool, path: object = ""
) -> np.ndarray:
    """[N, S] float32 weights: ones (release), or ones on the first n_real slots of each row."""
    if not real_only:
        return np.ones((n_rows, n_slots), dtype=np.float32)
    if n_real is None:
        raise InputError(
            f"{path}: no {'n_real_slots'!r} recorded, needed for real-slots-only EGR "
            "(extract it with eval/extract_features_zs_mask+prompt.py)"
        )
    return (np.arange(n_slots)[None, :] < n_real[:, None]).astype(np.float32)


def _finish(ops: Ops, s: Array, a: Array, b: Array, idx: Array, top_k: int) -> tuple:
    perm = ops.order_by_b_then_a(a, b, top_k)
    return tuple(ops.to_numpy(ops.take_along(t, perm, axis=1)) for t in (idx, s, a, b))


def _concat(parts: list[tuple]) -> Ranked:
    cols = list(zip(*parts))
    return Ranked(*(np.concatenate(c) for c in cols))


def egr_text_to_image(
    ops: Ops,
    text: Array,
    image: Array,
    prompt: Array,
    mask: Array,
    w_prompt: Array,
    w_mask: Array,
    top_k: int,
    chunk: int,
    pool: int = POOL,
    scores_out: Array | None = None,
    search: Callable[..., TopkRows] = chunked_topk,
) -> Ranked:
    """T2I EGR for every text query. Arrays: text [Q, D], image [N, D], slots [Q, S, D], weights [Q, S].

    `scores_out` ([Q, N], optional) receives all text-image scores (see topk.shared_scores);
    `search` finds the candidates (chunked_topk, or topk.faiss_topk).
    """
    # The T2I terms are linear in the slot features: only the weighted slot sums are needed
    # (sum_j w_j m_j . x == (sum_j w_j m_j) . x). On a small gallery they score every item in the
    # same matrix product as s; on a large one only the candidates are scored.
    n_m = ops.f64(w_mask.sum(1))
    n_p = ops.f64(w_prompt.sum(1))
    extras = ops.concat([w_mask[:, None] @ mask, w_prompt[:, None] @ prompt], 1)  # [Q, 2, D]
    in_product = search is chunked_topk and image.shape[0] <= EXTRAS_IN_PRODUCT * pool
    parts = []
    tops = search(
        ops, text, image, pool, chunk, extras=extras if in_product else None, scores_out=scores_out
    )
    for start, s, idx, x in tops:
        if x is None:  # candidates only: pairs (query, candidate) grouped by query
            n_q, n_c = idx.shape
            rows = ops.repeat(ops.arange(n_q), ops.full(n_q, n_c))
            x = pair_slot_dots(ops, image, idx.reshape(-1), rows, [extras[start : start + n_q]])[
                0
            ].reshape(n_q, n_c, 2)
        s = ops.f64(s)
        m_sum, p_sum = ops.f64(x[..., 0]), ops.f64(x[..., 1])
        nm, np_ = n_m[start : start + len(s), None], n_p[start : start + len(s), None]
        a = 0.9 * s + 0.1 * (nm * s - m_sum)
        p_mean = ops.where(np_ > 0, p_sum / ops.maximum(np_, 1), s)
        b = 0.99 * a + 0.01 * p_mean
        parts.append(_finish(ops, s, a, b, idx, top_k))
    return _concat(parts)


def egr_image_to_text(
    ops: Ops,
    image: Array,
    text: Array,
    prompt: Array,
    mask: Array,
    w_prompt: Array,
    w_mask: Array,
    top_k: int,
    chunk: int,
    pool: int = POOL,
    queries_per_pass: int = 8192,
    scores: Array | None = None,
    search: Callable[..., TopkRows] = chunked_topk,
) -> Ranked:
    """I2T EGR for every image query. Arrays: image [Q, D], text [N, D], slots [N, S, D], weights [N, S].

    `scores` ([Q, N], optional): image-text scores already computed (no second product); else
    `search` finds the candidates (chunked_topk, or topk.faiss_topk).
    """
    parts = []
    for q0 in range(0, image.shape[0], queries_per_pass):
        q_img = image[q0 : q0 + queries_per_pass]
        if scores is not None:
            tops = list(topk_of_scores(ops, scores[q0 : q0 + queries_per_pass], pool, chunk))
        else:
            tops = list(search(ops, q_img, text, pool, chunk))
        s_all = ops.concat([t[1] for t in tops])
        idx_all = ops.concat([t[2] for t in tops])
        n_q, n_c = idx_all.shape
        q_rows = ops.repeat(ops.arange(n_q), ops.full(n_q, n_c))
        # min(0, s - m_j) is not linear in the slots: every (image, candidate, slot) product is needed
        p_all, m_all = pair_slot_dots(ops, q_img, q_rows, idx_all.reshape(-1), [prompt, mask])
        p_all, m_all = p_all.reshape(n_q, n_c, -1), m_all.reshape(n_q, n_c, -1)
        rows = max(chunk, PAIR_BLOCK // (n_c * prompt.shape[1]))  # [rows, pool, S] float64 blocks
        for c0 in range(0, n_q, rows):
            sl = slice(c0, c0 + rows)
            s, idx = ops.f64(s_all[sl]), idx_all[sl]
            wp, wm = ops.f64(w_prompt[idx]), ops.f64(w_mask[idx])  # [B, P, S]
            n_p = wp.sum(-1)
            p_mean = ops.where(n_p > 0, (ops.f64(p_all[sl]) * wp).sum(-1) / ops.maximum(n_p, 1), s)
            a = 0.8 * s + 0.2 * p_mean
            b = 0.98 * a + 0.02 * (ops.minimum(s[..., None] - ops.f64(m_all[sl]), 0) * wm).sum(-1)
            parts.append(_finish(ops, s, a, b, idx, top_k))
    return _concat(parts)


def pair_slot_dots(
    ops: Ops,
    left: Array,
    left_idx: Array,
    right_idx: Array,
    slot_sets: list[Array],
    block: int = PAIR_BLOCK,
) -> list[Array]:
    """out[t][p, j] = slot_sets[t][right_idx[p], j] . left[left_idx[p]] for every pair p, float32.

    Pairs are grouped by their right row, so each right row's slots enter one batched
    product with all the left vectors paired with it: only left vectors are gathered
    (not S slot vectors per pair), in blocks of at most `block` floats (+ padding).
    """
    n_pairs, dim = left_idx.shape[0], left.shape[1]
    order = ops.argsort_stable(right_idx)
    groups, counts = ops.run_lengths(right_idx[order])
    starts = counts.cumsum(0) - counts
    cap = max(1, block // dim)
    if int(counts.max()) > cap:  # split very popular right rows into pieces of at most `cap` pairs
        pieces = (counts + cap - 1) // cap
        g = ops.repeat(ops.arange(len(counts)), pieces)
        k = ops.arange(len(g)) - ops.repeat(pieces.cumsum(0) - pieces, pieces)
        groups, starts, counts = (
            groups[g],
            starts[g] + k * cap,
            ops.minimum(counts[g] - k * cap, cap),
        )
    by_size = ops.argsort_stable(-counts)  # similar sizes share a block: little padding
    groups, counts, starts = groups[by_size], counts[by_size], starts[by_size]
    outs = [ops.empty((n_pairs, t.shape[1])) for t in slot_sets]
    flat_sets = [
        t.reshape(t.shape[0], -1) for t in slot_sets
    ]  # [N, S * D] views: row gathers are one copy
    n_groups, g0 = len(groups), 0
    while g0 < n_groups:
        width = int(counts[g0])  # largest group of the block
        g1 = min(n_groups, g0 + max(1, block // (width * dim)))
        cnt = counts[g0:g1]
        local = ops.repeat(ops.arange(g1 - g0), cnt)
        pos = ops.arange(len(local)) - ops.repeat(cnt.cumsum(0) - cnt, cnt)
        pair = order[starts[g0:g1][local] + pos]
        flat = local * width + pos
        src = ops.full(
            (g1 - g0) * width, 0
        )  # padding places take row 0: their products are never read
        src[flat] = left_idx[pair]
        padded = left[src].reshape(g1 - g0, width, dim)
        rows = groups[g0:g1]
        for out, slots, t in zip(outs, flat_sets, slot_sets):
            right = slots[rows].reshape(g1 - g0, t.shape[1], dim)
            prod = padded @ right.swapaxes(1, 2)  # [groups, width, S]
            out[pair] = prod.reshape(-1, t.shape[1])[flat]
        g0 = g1
    return outs


def egr_lists(
    ops: Ops,
    text: Features,
    image: Features,
    prompt: Features,
    mask: Features,
    top_k: int,
    chunk: int,
    real_only: bool = False,
    pool: int = POOL,
    use_faiss: bool = False,
) -> tuple[list[tuple[object, list]], list[tuple[object, list]]]:
    """T2I and I2T EGR rows `(query id, [[item id, s, a, b], ...])`, in feature-file order.

    `use_faiss`: candidates from FAISS's exact index instead of chunked_topk (same lists, bar ties).
    """
    check_sizes(k=top_k, chunk=chunk, pool=pool)
    search = first_stage(use_faiss)
    t = ops.asarray(text.data)
    i = ops.asarray(image.data)
    p = ops.asarray(prompt.data)
    m = ops.asarray(mask.data)
    wp = ops.asarray(
        slot_weights(prompt.n_slots, len(prompt), prompt.n_real, real_only, prompt.path)
    )
    wm = ops.asarray(slot_weights(mask.n_slots, len(mask), mask.n_real, real_only, mask.path))
    # one text-image product serves both directions when the score matrix is small enough to keep
    kept = None if use_faiss else shared_scores(ops, len(text), len(image))
    t2i = egr_text_to_image(
        ops, t, i, p, m, wp, wm, top_k, chunk, pool, scores_out=kept, search=search
    )
    i2t = egr_image_to_text(
        ops,
        i,
        t,
        p,
        m,
        wp,
        wm,
        top_k,
        chunk,
        pool,
        scores=None if kept is None else kept.T,
        search=search,
    )
    return _rows(text.ids, image.ids, t2i), _rows(image.ids, text.ids, i2t)


def _rows(query_ids: list, item_ids: list, r: Ranked) -> list[tuple[object, list]]:
    with _gc_paused():  # ~10^5 small lists: the cyclic GC would rescan them many times
        return [
            (qid, [[item_ids[j], sj, aj, bj] for j, sj, aj, bj in zip(idx, s, a, b)])
            for qid, idx, s, a, b in zip(
                query_ids, r.index.tolist(), r.s.tolist(), r.a.tolist(), r.b.tolist()
            )
        ]


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
