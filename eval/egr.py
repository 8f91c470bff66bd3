"""Entity-guided re-ranking, EGR (spec section 4.3), as batched tensor operations.

Notation: `s` = query-item dot product, `p_j` / `m_j` = dot product of the item
image with prompt / masked-caption slot j of the text. Slots are weighted by
`w_j` in {0, 1}: all ones reproduce the release (pads included); with
`real_only` the "" pad slots get weight 0.

- T2I: a = 0.9 s + 0.1 sum_j w_j (s - m_j),  b = 0.99 a + 0.01 mean_j p_j
- I2T: a = 0.8 s + 0.2 mean_j p_j,           b = 0.98 a + 0.02 sum_j w_j min(0, s - m_j)

(mean_j over the weighted slots; a text with no weighted slot uses s in place
of the prompt mean, i.e. no evidence either way.) Candidates are the `pool`
items with the largest s; they are ordered by a then by b (stable sorts,
descending) and the first `top_k` kept.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from agree.io import InputError
from eval.feature_io import Features
from eval.topk import as_tensor, chunked_topk, shared_scores, topk_of_scores

POOL = 128  # candidates re-ranked per query (release value)
PAIR_BLOCK = 1 << 21  # floats per gathered block in pair_slot_dots (8 MB in float32: cache-sized)


@dataclass
class Ranked:
    """Re-ranked lists of one direction: item rows and their s, a, b (float64), [Q, k] each."""

    index: np.ndarray
    s: np.ndarray
    a: np.ndarray
    b: np.ndarray


def slot_weights(n_slots: int, n_rows: int, n_real: np.ndarray | None, real_only: bool, path: object = "") -> np.ndarray:
    """[N, S] float32 weights: ones (release), or ones on the first n_real slots of each row."""
    if not real_only:
        return np.ones((n_rows, n_slots), dtype=np.float32)
    if n_real is None:
        raise InputError(
            f"{path}: no {'n_real_slots'!r} recorded, needed for real-slots-only EGR "
            "(extract it with eval/extract_features_zs_mask+prompt.py)"
        )
    return (np.arange(n_slots)[None, :] < n_real[:, None]).astype(np.float32)


def order_by_a_then_b(a: torch.Tensor, b: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """First k of the permutation given by a stable sort on a (descending), then a stable sort on b (descending).

    That is the order (b desc, a desc, position asc); rows without ties in b take a topk fast path.
    """
    k = b.shape[1] if k is None else min(k, b.shape[1])
    v, perm = b.topk(k, dim=1)
    tied = (v[:, 1:] == v[:, :-1]).any(dim=1) | ((b >= v[:, -1:]).sum(dim=1) > k)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        first = a[rows].argsort(dim=1, descending=True, stable=True)
        second = b[rows].gather(1, first).argsort(dim=1, descending=True, stable=True)
        perm[rows] = first.gather(1, second)[:, :k]
    return perm


def _finish(s: torch.Tensor, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, top_k: int) -> tuple:
    perm = order_by_a_then_b(a, b, top_k)
    return tuple(t.gather(1, perm).cpu().numpy() for t in (idx, s, a, b))


def _concat(parts: list[tuple]) -> Ranked:
    cols = list(zip(*parts))
    return Ranked(*(np.concatenate(c) for c in cols))


def egr_text_to_image(
    text: torch.Tensor,
    image: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    w_prompt: torch.Tensor,
    w_mask: torch.Tensor,
    top_k: int,
    chunk: int,
    pool: int = POOL,
    scores_out: torch.Tensor | None = None,
) -> Ranked:
    """T2I EGR for every text query. Tensors: text [Q, D], image [N, D], slots [Q, S, D], weights [Q, S].

    `scores_out` ([Q, N], optional) receives all text-image scores (see topk.shared_scores).
    """
    # The T2I terms are linear in the slot features, so the weighted slot sums score all
    # candidates in the same matrix product as s (sum_j w_j m_j . x == (sum_j w_j m_j) . x).
    n_m = w_mask.sum(1).double()
    n_p = w_prompt.sum(1).double()
    extras = torch.cat([torch.bmm(w_mask[:, None], mask), torch.bmm(w_prompt[:, None], prompt)], 1)  # [Q, 2, D]
    parts = []
    for start, s, idx, x in chunked_topk(text, image, pool, chunk, extras=extras, scores_out=scores_out):
        s = s.double()
        m_sum, p_sum = x[..., 0].double(), x[..., 1].double()
        nm, np_ = n_m[start : start + len(s), None].to(s.device), n_p[start : start + len(s), None].to(s.device)
        a = 0.9 * s + 0.1 * (nm * s - m_sum)
        p_mean = torch.where(np_ > 0, p_sum / np_.clamp(min=1), s)
        b = 0.99 * a + 0.01 * p_mean
        parts.append(_finish(s, a, b, idx, top_k))
    return _concat(parts)


def egr_image_to_text(
    image: torch.Tensor,
    text: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    w_prompt: torch.Tensor,
    w_mask: torch.Tensor,
    top_k: int,
    chunk: int,
    pool: int = POOL,
    queries_per_pass: int = 8192,
    scores: torch.Tensor | None = None,
) -> Ranked:
    """I2T EGR for every image query. Tensors: image [Q, D], text [N, D], slots [N, S, D], weights [N, S].

    `scores` ([Q, N], optional): image-text scores already computed (no second product).
    """
    parts = []
    for q0 in range(0, image.shape[0], queries_per_pass):
        q_img = image[q0 : q0 + queries_per_pass]
        if scores is not None:
            tops = list(topk_of_scores(scores[q0 : q0 + queries_per_pass], pool, chunk))
        else:
            tops = list(chunked_topk(q_img, text, pool, chunk))
        s_all = torch.cat([t[1] for t in tops])
        idx_all = torch.cat([t[2] for t in tops])
        n_q, n_c = idx_all.shape
        q_rows = torch.arange(n_q, device=idx_all.device).repeat_interleave(n_c)
        # min(0, s - m_j) is not linear in the slots: every (image, candidate, slot) product is needed
        p_all, m_all = pair_slot_dots(q_img.to(idx_all.device), q_rows, idx_all.reshape(-1), [prompt, mask])
        p_all, m_all = p_all.view(n_q, n_c, -1), m_all.view(n_q, n_c, -1)
        for c0 in range(0, n_q, chunk):
            sl = slice(c0, c0 + chunk)
            s, idx = s_all[sl].double(), idx_all[sl]
            wp, wm = w_prompt[idx].double(), w_mask[idx].double()  # [B, P, S]
            n_p = wp.sum(-1)
            p_mean = torch.where(n_p > 0, (p_all[sl].double() * wp).sum(-1) / n_p.clamp(min=1), s)
            a = 0.8 * s + 0.2 * p_mean
            b = 0.98 * a + 0.02 * ((s[..., None] - m_all[sl].double()).clamp(max=0) * wm).sum(-1)
            parts.append(_finish(s, a, b, idx, top_k))
    return _concat(parts)


def pair_slot_dots(
    left: torch.Tensor,
    left_idx: torch.Tensor,
    right_idx: torch.Tensor,
    slot_sets: list[torch.Tensor],
    block: int = PAIR_BLOCK,
) -> list[torch.Tensor]:
    """out[t][p, j] = slot_sets[t][right_idx[p], j] . left[left_idx[p]] for every pair p, float32.

    Pairs are grouped by their right row, so each right row's slots enter one batched
    product with all the left vectors paired with it: only left vectors are gathered
    (not S slot vectors per pair), in blocks of at most `block` floats (+ padding).
    """
    n_pairs, dim = left_idx.shape[0], left.shape[1]
    dev = left.device
    order = right_idx.argsort(stable=True)
    groups, counts = torch.unique_consecutive(right_idx[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    cap = max(1, block // dim)
    if int(counts.max()) > cap:  # split very popular right rows into pieces of at most `cap` pairs
        pieces = (counts + cap - 1) // cap
        g = torch.repeat_interleave(torch.arange(len(counts), device=dev), pieces)
        k = torch.arange(len(g), device=dev) - torch.repeat_interleave(pieces.cumsum(0) - pieces, pieces)
        groups, starts, counts = groups[g], starts[g] + k * cap, (counts[g] - k * cap).clamp(max=cap)
    by_size = counts.argsort(descending=True, stable=True)  # similar sizes share a block: little padding
    groups, counts, starts = groups[by_size], counts[by_size], starts[by_size]
    outs = [torch.empty(n_pairs, t.shape[1], dtype=torch.float32, device=dev) for t in slot_sets]
    flat_sets = [t.reshape(t.shape[0], -1) for t in slot_sets]  # [N, S * D] views: row gathers are one copy
    left_ext = torch.cat([left, left.new_zeros(1, dim)])  # last row: zeros for padding slots
    pad_row = left.shape[0]
    n_groups, g0 = len(groups), 0
    while g0 < n_groups:
        width = int(counts[g0])  # largest group of the block
        g1 = min(n_groups, g0 + max(1, block // (width * dim)))
        cnt = counts[g0:g1]
        local = torch.repeat_interleave(torch.arange(g1 - g0, device=dev), cnt)
        pos = torch.arange(len(local), device=dev) - torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt)
        pair = order[starts[g0:g1][local] + pos]
        flat = local * width + pos
        src = torch.full(((g1 - g0) * width,), pad_row, dtype=torch.long, device=dev)
        src[flat] = left_idx[pair]
        padded = left_ext.index_select(0, src).view(g1 - g0, width, dim)
        rows = groups[g0:g1]
        for out, slots, t in zip(outs, flat_sets, slot_sets):
            right = slots.index_select(0, rows).view(g1 - g0, t.shape[1], dim)
            prod = torch.bmm(padded, right.transpose(1, 2))  # [groups, width, S]
            out[pair] = prod.view(-1, t.shape[1]).index_select(0, flat)
        g0 = g1
    return outs


def egr_lists(
    text: Features,
    image: Features,
    prompt: Features,
    mask: Features,
    top_k: int,
    chunk: int,
    device: torch.device,
    real_only: bool = False,
    pool: int = POOL,
) -> tuple[list[tuple[object, list]], list[tuple[object, list]]]:
    """T2I and I2T EGR rows `(query id, [[item id, s, a, b], ...])`, in feature-file order."""
    if top_k < 1 or chunk < 1 or pool < 1:
        raise InputError(f"--top-k, --eval-batch-size and --pool-size must be at least 1 (got {top_k}, {chunk}, {pool})")
    t = as_tensor(text.data, device)
    i = as_tensor(image.data, device)
    p = as_tensor(prompt.data, device)
    m = as_tensor(mask.data, device)
    wp = as_tensor(slot_weights(prompt.n_slots, len(prompt), prompt.n_real, real_only, prompt.path), device)
    wm = as_tensor(slot_weights(mask.n_slots, len(mask), mask.n_real, real_only, mask.path), device)
    kept = shared_scores(len(text), len(image), device)  # one text-image product serves both directions
    t2i = egr_text_to_image(t, i, p, m, wp, wm, top_k, chunk, pool, scores_out=kept)
    i2t = egr_image_to_text(i, t, p, m, wp, wm, top_k, chunk, pool, scores=None if kept is None else kept.T)
    return _rows(text.ids, image.ids, t2i), _rows(image.ids, text.ids, i2t)


def _rows(query_ids: list, item_ids: list, r: Ranked) -> list[tuple[object, list]]:
    with _gc_paused():  # ~10^5 small lists: the cyclic GC would rescan torch's objects many times
        return [
            (qid, [[item_ids[j], sj, aj, bj] for j, sj, aj, bj in zip(idx, s, a, b)])
            for qid, idx, s, a, b in zip(query_ids, r.index.tolist(), r.s.tolist(), r.a.tolist(), r.b.tolist())
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
