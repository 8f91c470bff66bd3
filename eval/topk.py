"""Chunked dot-product scoring and top-k selection (bounded memory, CPU or CUDA)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from agree.io import InputError
from eval.feature_io import Features

ITEM_CHUNK = 65536  # items scored at once per query chunk: memory ~ chunk x ITEM_CHUNK x (1 + extras)


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
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """For each chunk of queries yield `(start, scores, indices, extra_scores)`.

    `scores`/`indices` are [B, k]: the k items with the largest dot product, ordered
    by score descending, ties by item index (which of several items tied at the
    k-th score gets in is not specified). `extras` ([Q, E, D], optional) are
    more query vectors scored against the same items; `extra_scores` [B, k, E] are
    their dot products with the selected items (computed in the same matrix product).
    Memory is bounded by `chunk x item_chunk`, never by the full score matrix.
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
        # canonical order: score descending, ties by item index (two stable sorts)
        by_index = best_i.argsort(dim=1, stable=True)
        best_s, best_i = best_s.gather(1, by_index), best_i.gather(1, by_index)
        by_score = best_s.argsort(dim=1, descending=True, stable=True)
        best_s, best_i = best_s.gather(1, by_score), best_i.gather(1, by_score)
        if n_extra:
            perm = by_index.gather(1, by_score)
            best_x = best_x.gather(1, perm[..., None].expand(-1, -1, n_extra))
        yield start, best_s, best_i, best_x


def topk_lists(queries: Features, items: Features, k: int, chunk: int, device: torch.device) -> list[tuple[object, list]]:
    """`(query id, [ids of its k best items])` for every query, in the queries' file order."""
    if k < 1 or chunk < 1:
        raise InputError(f"--top-k and --eval-batch-size must be at least 1 (got {k}, {chunk})")
    item_t = as_tensor(items.data, device)
    query_t = torch.from_numpy(queries.data)
    ids = items.ids
    rows: list[tuple[object, list]] = []
    for start, _, idx, _ in chunked_topk(query_t, item_t, k, chunk):
        for qid, row in zip(queries.ids[start : start + len(idx)], idx.cpu().tolist()):
            rows.append((qid, [ids[i] for i in row]))
    return rows
