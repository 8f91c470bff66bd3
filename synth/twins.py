"""A compositional test split: hard-negative twins (image A, image B; caption a, caption b).

Each pair differs in one way (kind): `binding` (the colours move to other shapes), `size` (the size
classes move), `mirror` (the layout is mirrored, so left and right swap) or `recolour` (one entity
changes colour). Caption a is true of A and false of B, caption b the reverse, and the two captions
use the same words as far as the difference allows (Winoground's construction):
"a large red circle and a small blue star." / "a large blue circle and a small red star."
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from agree.io import atomic_path, atomic_write, dumps
from agree.npz import NpzWriter
from synth.captions import join_phrases
from synth.render import render_scene, to_storage
from synth.world import (
    Entity,
    Scene,
    binding_partner,
    mirror_partner,
    pick,
    recolour_partner,
    relations,
    sample_scene,
    size_partner,
)

TWIN_KINDS: tuple[str, ...] = ("binding", "size", "mirror", "recolour")
TWIN_SPLIT_CODE = 6  # random streams apart from the other splits (synth.writer.SPLIT_CODES)
LEFT_WORDS, RIGHT_WORDS = ("left of", "to the left of"), ("right of", "to the right of")
_PARTNERS: dict[str, Callable[[np.random.Generator, Scene], Optional[Scene]]] = {
    "binding": binding_partner,
    "size": size_partner,
    "mirror": lambda rng, scene: mirror_partner(scene),
    "recolour": recolour_partner,
}


@dataclass
class TwinFiles:
    """The twin split's files under one folder."""

    root: Path

    @property
    def images(self) -> Path:
        """Images, npz key = str(image id)."""
        return self.root / "twin_images.npz"

    @property
    def texts(self) -> Path:
        """Captions, JSONL `{"query_id", "query_text"}` (the test-texts format, without `item_ids`)."""
        return self.root / "twin_texts.jsonl"

    @property
    def pairs(self) -> Path:
        """Pairs, JSONL `{"kind", "image_a", "image_b", "text_a", "text_b"}` (ids of the two files above)."""
        return self.root / "twin_pairs.jsonl"


def full_phrase(e: Entity) -> str:
    """'a large red circle': size, colour and shape (unique in any scene of the world)."""
    return f"a {e.size} {e.colour} {e.shape}"


def _match(a: list[Entity], b: list[Entity]) -> list[Entity]:
    """B's entities in the order of their counterparts in `a` (same shape first, then most shared attributes)."""
    left = list(b)
    out = []
    for e in a:
        best = max(
            left, key=lambda x: (x.shape == e.shape, (x.colour == e.colour) + (x.size == e.size))
        )
        left.remove(best)
        out.append(best)
    return out


def twin_captions(
    kind: str, a: Scene, b: Scene, rng: np.random.Generator
) -> Optional[tuple[str, str]]:
    """Caption a (true of A, false of B) and caption b (the reverse), or None when the kind has no such pair."""
    if kind == "mirror":
        r = a.resolution
        pairs = [
            (i, j)
            for i in range(len(a.entities))
            for j in range(len(a.entities))
            if i != j and "left" in relations(a.entities[i], a.entities[j], r)
        ]
        if not pairs:
            return None
        i, j = pick(rng, pairs)
        x, y = (f"a {a.entities[k].colour} {a.entities[k].shape}" for k in (i, j))
        w = int(rng.integers(len(LEFT_WORDS)))
        return f"{x} {LEFT_WORDS[w]} {y}.", f"{x} {RIGHT_WORDS[w]} {y}."
    order = [int(k) for k in rng.permutation(len(a.entities))]
    ents_a = [a.entities[k] for k in order]
    ents_b = _match(ents_a, b.entities)
    text_a = join_phrases([full_phrase(e) for e in ents_a]) + "."
    text_b = join_phrases([full_phrase(e) for e in ents_b]) + "."
    return (text_a, text_b) if text_a != text_b else None


def make_twin(kind: str, seed: int, index: int, resolution: int) -> tuple[Scene, Scene, str, str]:
    """The index-th twin of a kind: scenes A and B and their captions (deterministic in seed, kind, index)."""
    k = TWIN_KINDS.index(kind)
    for attempt in range(1000):
        rng = np.random.default_rng([seed, TWIN_SPLIT_CODE, k, index, attempt])
        a = sample_scene(rng, resolution)
        if kind != "recolour" and len(a.entities) < 2:
            continue
        b = _PARTNERS[kind](rng, a)
        if b is None:
            continue
        caps = twin_captions(kind, a, b, rng)
        if caps is not None:
            return a, b, caps[0], caps[1]
    raise RuntimeError(
        f"no {kind} twin found for index {index}"
    )  # pragma: no cover - needs 1000 bad draws


def write_twins(root: Path, seed: int, per_kind: int, resolution: int) -> dict[str, int]:
    """Write `per_kind` pairs of every kind under `root` (all files appear together); counts per kind."""
    files = TwinFiles(Path(root))
    counts = {}
    with contextlib.ExitStack() as stack:
        images = NpzWriter(stack.enter_context(atomic_path(files.images)))
        stack.callback(images.close)
        texts = stack.enter_context(atomic_write(files.texts))
        pairs = stack.enter_context(atomic_write(files.pairs))
        n = 0
        for kind in TWIN_KINDS:
            for i in range(per_kind):
                a, b, text_a, text_b = make_twin(kind, seed, i, resolution)
                ia, ib = 2 * n, 2 * n + 1
                images.add(str(ia), to_storage(render_scene(a).image, False))
                images.add(str(ib), to_storage(render_scene(b).image, False))
                texts.write(dumps({"query_id": ia, "query_text": text_a}) + b"\n")
                texts.write(dumps({"query_id": ib, "query_text": text_b}) + b"\n")
                pairs.write(
                    dumps({"kind": kind, "image_a": ia, "image_b": ib, "text_a": ia, "text_b": ib})
                    + b"\n"
                )
                n += 1
            counts[kind] = per_kind
    return counts
