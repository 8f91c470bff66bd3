"""A synthetic AGREE training batch (random images, caption-like texts with entity prompts and
masks), for the benchmarks."""

from __future__ import annotations

import torch

from agree.entities import TRAIN_SLOTS, prompt, training_slots
from clip.clip import tokenize
from training.terms import IMAGE_SLOTS

WORDS = "man woman dog shirt red blue street ball tree car hat young old small tall running".split()


def make_batch(b: int, resolution: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every slot of an AGREE batch of `b` examples: 4 images [b, 3, R, R]; caption, VG prompt, 5 prompts, 5 masks."""
    g = torch.Generator().manual_seed(seed)

    def words(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))

    captions = [f"a {words(3)} is next to a {words(4)} on the {words(2)}" for _ in range(b)]
    slots = [training_slots(c, [words(2), words(3), words(1)]) for c in captions]
    batch = {k: torch.randn(b, 3, resolution, resolution, generator=g) for k in IMAGE_SLOTS}
    batch.update(
        text=tokenize(captions),
        vg_text=tokenize([prompt(words(1)) for _ in range(b)]),
        prompts=tokenize(sum((s.prompts for s in slots), [])).view(b, TRAIN_SLOTS, -1),
        masked=tokenize(sum((s.masked for s in slots), [])).view(b, TRAIN_SLOTS, -1),
    )
    return batch
