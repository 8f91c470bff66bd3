"""Token ids of an example's texts: clip.tokenize with a per-process cache of each text's ids.

An AGREE example has twelve texts; the entity prompts ("a photo containing a man"), the "" pads and
the Visual Genome prompts repeat across examples, and every text repeats across epochs. The ids of a
text are what clip.tokenize gives for it (computed by it on the first use), so the batches are the
same with or without the cache.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from clip.clip import get_tokenizer, tokenize

CONTEXT = 77
CACHE_TEXTS = 1 << 16  # texts kept per process (~20 MB)


def _ids(text: str) -> tuple[int, ...]:
    """The ids clip.tokenize gives `text`, up to its (last) end token; the rest is padding."""
    ids = tokenize([text], CONTEXT)[0].tolist()
    end = ids[::-1].index(get_tokenizer().eot_token)
    return tuple(ids[: len(ids) - end])


class Tokenizer:
    """texts -> LongTensor (N, 77), equal to clip.tokenize(texts)."""

    def __init__(self, cache_texts: int = CACHE_TEXTS):
        self.cache_texts = cache_texts
        self._cached = lru_cache(maxsize=cache_texts)(_ids)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = np.zeros((len(texts), CONTEXT), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self._cached(text)
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:  # the cache stays in its process
        return {"cache_texts": self.cache_texts}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_texts"])
