"""Chunked dot-product scoring and top-k selection (bounded memory, CPU or CUDA)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from agree.io import InputError
from eval.feature_io import Features

ITEM_CHUNK = 65536  # items scored at once per query chunk: memory ~ chunk x ITEM_CHUNK x (1 + extras)
SHARED_SCORES_MAX = 1 << 25  # keep the score matrix for the reverse direction up to this many floats (128 MB)


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor on `device` (shares memory with `array` on CPU)."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


def chunked_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    chunk: int,
    extras: torch.Tensor | None = None,
    item_chunk: int = ITEM_CHUNK,
    scores_out: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """For each chunk of queries yield `(start, scores, indices, extra_scores)`.

    `scores`/`indices` are [B, k]: the k items with the largest dot product, ordered
    by score descending, ties by item index (which of several items tied at the
    k-th score gets in is not specified). `extras` ([Q, E, D], optional) are
    more query vectors scored against the same items; `extra_scores` [B, k, E] are
    their dot products with the selected items (computed in the same matrix product).
    Memory is bounded by `chunk x item_chunk`, never by the full score matrix, unless
    `scores_out` ([Q, N], see `shared_scores`) is given to keep it for the reverse direction.
    """
    n_q, n_items = queries.shape[0], items.shape[0]
    k = min(k, n_items)
    n_extra = 0 if extras is None else extras.shape[1]
    dev = items.device
    for start in range(0, n_q, chunk):
        q = queries[start : start + chunk].to(dev)
        b = q.shape[0]
        if extras is not None:  # one product for the query and its extra vectors: rows [B, 1 + E]
            q = torch.cat([q[:, None], extras[start : start + chunk].to(dev)], dim=1).reshape(b * (1 + n_extra), -1)
        best_s = best_i = best_x = None
        for i0 in range(0, n_items, item_chunk):
            block = (q @ items[i0 : i0 + item_chunk].T).view(b, 1 + n_extra, -1)
            if scores_out is not None:
                scores_out[start : start + b, i0 : i0 + block.shape[-1]] = block[:, 0]
            kk = min(k, block.shape[-1])
            s, i = block[:, 0].topk(kk, dim=1)
            x = block[:, 1:].gather(2, i[:, None].expand(-1, n_extra, -1)).transpose(1, 2) if n_extra else None
            i = i + i0
            if best_s is not None:  # merge with the best of the earlier item chunks
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                x = torch.cat([best_x, x], 1) if n_extra else None
                s, sel = s.topk(min(k, s.shape[1]), dim=1)
                i = i.gather(1, sel)
                x = x.gather(1, sel[..., None].expand(-1, -1, n_extra)) if n_extra else None
            best_s, best_i, best_x = s, i, x
        best_s, best_i, best_x = _ties_by_index(best_s, best_i, best_x)
        yield start, best_s, best_i, best_x


def shared_scores(n_queries: int, n_items: int, device: torch.device) -> torch.Tensor | None:
    """A [n_queries, n_items] buffer for `scores_out` when small enough, else None (compute twice)."""
    if n_queries * n_items > SHARED_SCORES_MAX:
        return None
    return torch.empty(n_queries, n_items, device=device)


def topk_of_scores(scores: torch.Tensor, k: int, chunk: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, None]]:
    """chunked_topk's output from a kept score matrix (e.g. the transposed one of the other direction)."""
    k = min(k, scores.shape[1])
    for start in range(0, scores.shape[0], chunk):
        s, i = scores[start : start + chunk].contiguous().topk(k, dim=1)
        s, i, _ = _ties_by_index(s, i, None)
        yield start, s, i, None


def topk_lists(
    text: Features, image: Features, k: int, chunk: int, device: torch.device
) -> tuple[list[tuple[object, list]], list[tuple[object, list]]]:
    """T2I and I2T rows `(query id, [ids of its k best items])`, each in its feature file's order."""
    if k < 1 or chunk < 1:
        raise InputError(f"--top-k and --eval-batch-size must be at least 1 (got {k}, {chunk})")
    text_t, image_t = as_tensor(text.data, device), as_tensor(image.data, device)
    kept = shared_scores(len(text), len(image), device)
    t2i = _id_rows(text.ids, image.ids, chunked_topk(text_t, image_t, k, chunk, scores_out=kept))
    tops = topk_of_scores(kept.T, k, chunk) if kept is not None else chunked_topk(image_t, text_t, k, chunk)
    return t2i, _id_rows(image.ids, text.ids, tops)


def _id_rows(query_ids: list, item_ids: list, tops: Iterator) -> list[tuple[object, list]]:
    rows: list[tuple[object, list]] = []
    for start, _, idx, _ in tops:
        for qid, row in zip(query_ids[start : start + len(idx)], idx.cpu().tolist()):
            rows.append((qid, [item_ids[i] for i in row]))
    return rows


def _ties_by_index(s: torch.Tensor, i: torch.Tensor, x: torch.Tensor | None):
    """Reorder rows of topk output (score descending) so equal scores come in item-index order."""
    tied = (s[:, 1:] == s[:, :-1]).any(dim=1)
    if not bool(tied.any()):  # the usual case: topk's order is already canonical
        return s, i, x
    rows = tied.nonzero().squeeze(1)
    rs, ri = s[rows], i[rows]
    perm = ri.argsort(dim=1, stable=True)  # by index, then stably by score
    perm = perm.gather(1, rs.gather(1, perm).argsort(dim=1, descending=True, stable=True))
    s, i = s.clone(), i.clone()
    s[rows], i[rows] = rs.gather(1, perm), ri.gather(1, perm)
    if x is not None:
        x = x.clone()
        x[rows] = x[rows].gather(1, perm[..., None].expand(-1, -1, x.shape[-1]))
    return s, i, x
