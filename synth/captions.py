"""Captions for synthetic scenes: the target style, the simpler pretraining style, segs and preds.

Every entity phrase is a referring expression that is unique within its scene (a colour+shape
pair never repeats in a scene; bare or size+shape forms are used only when unambiguous), so a
phrase, or a grounding label made from it, always denotes exactly one entity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from synth.world import Scene, between, pick, regions, relations, weighted_index

SIZE_WORDS_TARGET: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "large": ("large", "big"),
}
SIZE_WORDS_PRETRAIN: dict[str, tuple[str, ...]] = {"small": ("small",), "large": ("large",)}
REL_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "near": ("next to", "near", "beside"),
    "front": ("in front of", "partly covering"),
}
REGION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left",),
    "right": ("on the right",),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "top left": ("in the top left corner", "in the upper left"),
    "top right": ("in the top right corner", "in the upper right"),
    "bottom left": ("in the bottom left corner", "in the lower left"),
    "bottom right": ("in the bottom right corner", "in the lower right"),
    "middle": ("in the middle", "in the center"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
CAPTIONS_PER_TEST_IMAGE = 5
# fraction of captions whose grounding found nothing usable (exercises the training fallback)
PRED_EMPTY_PROB = 0.05
PRED_MISS_PROB = 0.1


@dataclass
class Caption:
    """One caption with what it claims: mentioned entities (text order) and checkable facts."""

    text: str
    template: str
    mentions: list[tuple[str, int]]
    claims: list[list] = field(default_factory=list)
    chunks: list[str] = field(
        default_factory=list
    )  # non-entity noun phrases a chunker would return

    def to_json(self) -> dict:
        """JSON-ready description (metadata files)."""
        return {
            "text": self.text,
            "template": self.template,
            "mentions": [list(m) for m in self.mentions],
            "claims": self.claims,
            "chunks": self.chunks,
        }


_FORM_WEIGHTS = {"full": 0.35, "colour": 0.35, "size": 0.15, "bare": 0.15}


def article(words: list[str], definite: bool) -> str:
    """'the', or 'a'/'an' by the first word's initial letter."""
    if definite:
        return "the"
    return "an" if words[0][0] in "aeiou" else "a"


def refer(
    scene: Scene,
    i: int,
    rng: np.random.Generator,
    *,
    sizes: dict[str, tuple[str, ...]] = SIZE_WORDS_TARGET,
    forms: Optional[tuple[str, ...]] = None,
    with_article: bool = True,
    definite_prob: float = 0.15,
) -> str:
    """A referring expression for entity i that no other entity of the scene matches."""
    e = scene.entities[i]
    avail = ["full", "colour"]
    if scene.size_shape_count(e.size, e.shape) == 1:
        avail.append("size")
    if scene.shape_count(e.shape) == 1:
        avail.append("bare")
    if forms is not None:
        avail = [f for f in avail if f in forms] or ["colour"]
    form = avail[weighted_index(rng, [_FORM_WEIGHTS[f] for f in avail])]
    size_word = pick(rng, sizes[e.size])
    words = {
        "full": [size_word, e.colour, e.shape],
        "colour": [e.colour, e.shape],
        "size": [size_word, e.shape],
        "bare": [e.shape],
    }[form]
    if not with_article:
        return " ".join(words)
    definite = bool(rng.random() < definite_prob)
    return " ".join([article(words, definite)] + words)


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _rel_chunk(words: str) -> list[str]:
    for side in ("left", "right"):
        if words in (f"to the {side} of", f"on the {side} of"):
            return [f"the {side}"]
    return ["front"] if words == "in front of" else []


def _region_chunk(words: str) -> list[str]:
    return [words.split(" ", 1)[1]]  # drop the preposition: "on the left" -> "the left"


def _pairs(scene: Scene) -> list[tuple[int, int, str]]:
    r = scene.resolution
    ents = scene.entities
    out = [
        (i, j, rel)
        for i in range(len(ents))
        for j in range(len(ents))
        if i != j
        for rel in relations(ents[i], ents[j], r)
    ]
    out += [(i, j, "front") for i, j in scene.covers]
    return out


def _with_regions(scene: Scene) -> list[int]:
    return [i for i, e in enumerate(scene.entities) if regions(e, scene.resolution)]


def _region_words(scene: Scene, i: int, rng: np.random.Generator) -> tuple[str, str]:
    region = pick(rng, regions(scene.entities[i], scene.resolution))
    return region, pick(rng, REGION_WORDS[region])


Template = Callable[[Scene, np.random.Generator], Optional[Caption]]


def _relational(
    lead: Callable[[np.random.Generator], tuple[str, list[str]]], name: str
) -> Template:
    def make(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
        pairs = _pairs(scene)
        if not pairs:
            return None
        i, j, rel = pick(rng, pairs)
        a, b = refer(scene, i, rng), refer(scene, j, rng)
        words = pick(rng, REL_WORDS[rel])
        prefix, chunks = lead(rng)
        text = f"{prefix}{a} {words} {b}."
        return Caption(
            text, name, [(a, i), (b, j)], [["rel", i, rel, j]], chunks + _rel_chunk(words)
        )

    return make


def _lead_none(rng: np.random.Generator) -> tuple[str, list[str]]:
    return "", []


def _lead_there(rng: np.random.Generator) -> tuple[str, list[str]]:
    return "there is ", []


def _lead_scene(rng: np.random.Generator) -> tuple[str, list[str]]:
    lead = pick(rng, ("a scene with", "a picture showing"))
    return lead + " ", [" ".join(lead.split()[:2])]


def t_rel_region(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{A} {rel} {B}, with {C} {region}." """
    triples = [
        (i, j, rel, k)
        for i, j, rel in _pairs(scene)
        for k in _with_regions(scene)
        if k not in (i, j)
    ]
    if not triples:
        return None
    i, j, rel, k = pick(rng, triples)
    a, b, c = refer(scene, i, rng), refer(scene, j, rng), refer(scene, k, rng)
    words = pick(rng, REL_WORDS[rel])
    region, rwords = _region_words(scene, k, rng)
    text = f"{a} {words} {b}, with {c} {rwords}."
    return Caption(
        text,
        "rel_region",
        [(a, i), (b, j), (c, k)],
        [["rel", i, rel, j], ["region", k, region]],
        _rel_chunk(words) + _region_chunk(rwords),
    )


def t_regions(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{A} {region} and {B} {region}." (one or two entities)"""
    cands = _with_regions(scene)
    if not cands:
        return None
    chosen = [
        int(k) for k in rng.permutation(cands)[: 1 + int(len(cands) > 1 and rng.random() < 0.7)]
    ]
    parts, mentions, claims, chunks = [], [], [], []
    for k in chosen:
        p = refer(scene, k, rng)
        region, rwords = _region_words(scene, k, rng)
        parts.append(f"{p} {rwords}")
        mentions.append((p, k))
        claims.append(["region", k, region])
        chunks += _region_chunk(rwords)
    return Caption(" and ".join(parts) + ".", "regions", mentions, claims, chunks)


def t_there_region(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "there is {A} {region}." """
    cands = _with_regions(scene)
    if not cands:
        return None
    k = int(pick(rng, cands))
    p = refer(scene, k, rng)
    region, rwords = _region_words(scene, k, rng)
    return Caption(
        f"there is {p} {rwords}.",
        "there_region",
        [(p, k)],
        [["region", k, region]],
        _region_chunk(rwords),
    )


def t_count(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{n} shapes: {all entities}." """
    n = len(scene.entities)
    order = [int(k) for k in rng.permutation(n)]
    phrases = [refer(scene, k, rng) for k in order]
    if n == 1:
        return Caption(
            f"just one shape: {phrases[0]}.",
            "count",
            [(phrases[0], 0)],
            [["count", 1]],
            ["one shape"],
        )
    head = f"{COUNT_WORDS[n]} shapes"
    return Caption(
        f"{head}: {join_phrases(phrases)}.",
        "count",
        list(zip(phrases, order)),
        [["count", n]],
        [head],
    )


def t_compare(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{A} is bigger/smaller than {B}." (different size classes)"""
    ents = scene.entities
    pairs = [
        (i, j) for i in range(len(ents)) for j in range(len(ents)) if ents[i].size != ents[j].size
    ]
    if not pairs:
        return None
    i, j = pick(rng, pairs)
    a = refer(scene, i, rng, forms=("colour", "bare"))
    b = refer(scene, j, rng, forms=("colour", "bare"))
    word = pick(rng, ("bigger", "larger")) if ents[i].size == "large" else "smaller"
    claim = ["larger", i, j] if ents[i].size == "large" else ["larger", j, i]
    return Caption(f"{a} is {word} than {b}.", "compare", [(a, i), (b, j)], [claim], [])


def t_between(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{A} between {B} and {C}." """
    ents, r = scene.entities, scene.resolution
    n = len(ents)
    triples = [
        (i, j, k)
        for i in range(n)
        for j in range(n)
        for k in range(j + 1, n)
        if len({i, j, k}) == 3 and between(ents[i], ents[j], ents[k], r)
    ]
    if not triples:
        return None
    i, j, k = pick(rng, triples)
    if rng.random() < 0.5:
        j, k = k, j
    a, b, c = refer(scene, i, rng), refer(scene, j, rng), refer(scene, k, rng)
    return Caption(
        f"{a} between {b} and {c}.", "between", [(a, i), (b, j), (c, k)], [["between", i, j, k]], []
    )


def t_together(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{A} and {B} in one image." (a subset of two or more)"""
    n = len(scene.entities)
    if n < 2:
        return None
    m = int(rng.integers(2, n + 1))
    order = [int(k) for k in rng.permutation(n)[:m]]
    phrases = [refer(scene, k, rng) for k in order]
    return Caption(
        f"{join_phrases(phrases)} in one image.",
        "together",
        list(zip(phrases, order)),
        [],
        ["one image"],
    )


def t_alone(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "{A} by itself." / "only {A}." (single-entity scenes)"""
    if len(scene.entities) != 1:
        return None
    p = refer(scene, 0, rng)
    text = f"{p} by itself." if rng.random() < 0.5 else f"only {p}."
    return Caption(text, "alone", [(p, 0)], [["count", 1]], [])


def t_picture(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """ "a picture of {A}." (single-entity scenes)"""
    if len(scene.entities) != 1:
        return None
    p = refer(scene, 0, rng)
    return Caption(f"a picture of {p}.", "picture", [(p, 0)], [], ["a picture"])


TARGET_TEMPLATES: dict[str, Template] = {
    "rel": _relational(_lead_none, "rel"),
    "there_rel": _relational(_lead_there, "there_rel"),
    "scene_rel": _relational(_lead_scene, "scene_rel"),
    "rel_region": t_rel_region,
    "regions": t_regions,
    "there_region": t_there_region,
    "count": t_count,
    "compare": t_compare,
    "between": t_between,
    "together": t_together,
    "alone": t_alone,
    "picture": t_picture,
}


def p_photo(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """Pretraining style: "a photo of a circle and a star in blue and red." """
    return _pretrain_list(
        scene,
        rng,
        "p_photo",
        lambda shapes, colours: f"a photo of {join_phrases(shapes)} in {join_phrases(colours)}.",
        True,
    )


def p_image(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """Pretraining style: "an image of a circle and a star; colours: red, blue; sizes: large, small." """
    sizes = list(
        dict.fromkeys(scene.entities[int(k)].size for k in rng.permutation(len(scene.entities)))
    )
    return _pretrain_list(
        scene,
        rng,
        "p_image",
        lambda shapes, colours: (
            f"an image of {join_phrases(shapes)}; "
            f"colours: {', '.join(colours)}; sizes: {', '.join(sizes)}."
        ),
        True,
    )


def p_picture(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """Pretraining style, shapes only: "a picture of a circle and a star." """
    return _pretrain_list(
        scene,
        rng,
        "p_picture",
        lambda shapes, colours: f"a picture of {join_phrases(shapes)}.",
        True,
    )


def p_shapes(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """Pretraining style, shapes only: "shapes: circle, star" (no articles)."""
    return _pretrain_list(
        scene, rng, "p_shapes", lambda shapes, colours: f"shapes: {', '.join(shapes)}", False
    )


def p_bare(scene: Scene, rng: np.random.Generator) -> Optional[Caption]:
    """Pretraining style: "circle, star; red, blue" (no articles)."""
    return _pretrain_list(
        scene,
        rng,
        "p_bare",
        lambda shapes, colours: f"{', '.join(shapes)}; {', '.join(colours)}",
        False,
    )


def _pretrain_list(
    scene: Scene,
    rng: np.random.Generator,
    name: str,
    fmt: Callable[[list[str], list[str]], str],
    articles: bool,
) -> Caption:
    """Every entity's shape, then (in most templates) the colours present in an independent order: what is in
    the image, never which colour belongs to which shape (the binding is left for the target captions)."""
    n = len(scene.entities)
    order = [int(k) for k in rng.permutation(n)]
    phrases = [
        f"{article([scene.entities[k].shape], False)} {scene.entities[k].shape}"
        if articles
        else scene.entities[k].shape
        for k in order
    ]
    colours = list(dict.fromkeys(scene.entities[int(k)].colour for k in rng.permutation(n)))
    return Caption(fmt(phrases, colours), name, list(zip(phrases, order)), [["count", n]], [])


# Two of the five name the shapes alone: with the colours in every caption, the contrastive task can be solved
# from colour alone, and a backbone trained that way does not learn to recognise shapes.
PRETRAIN_TEMPLATES: dict[str, Template] = {
    "p_photo": p_photo,
    "p_image": p_image,
    "p_bare": p_bare,
    "p_picture": p_picture,
    "p_shapes": p_shapes,
}


def make_captions(
    scene: Scene, rng: np.random.Generator, n: int, templates: dict[str, Template]
) -> list[Caption]:
    """n distinct captions, spreading over the applicable templates before reusing one."""
    names = list(templates)
    out: list[Caption] = []
    seen: set[str] = set()
    unused = [int(k) for k in rng.permutation(len(names))]
    for _ in range(200):
        if len(out) == n:
            break
        name = names[unused.pop(0)] if unused else pick(rng, names)
        cap = templates[name](scene, rng)
        if cap is not None and cap.text not in seen:
            seen.add(cap.text)
            out.append(cap)
    if len(out) < n:  # pragma: no cover - needs an implausibly unlucky stream
        raise RuntimeError(f"could only make {len(out)} distinct captions")
    return out


def target_captions(
    scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_TEST_IMAGE
) -> list[Caption]:
    """Captions in the target (fine-tuning/test) style: sizes, relations, regions, counts, comparisons."""
    return make_captions(scene, rng, n, TARGET_TEMPLATES)


def pretrain_captions(scene: Scene, rng: np.random.Generator, n: int) -> list[Caption]:
    """Captions in the simpler pretraining style: every entity listed by colour (and sometimes size)."""
    return make_captions(scene, rng, n, PRETRAIN_TEMPLATES)


def segs_for(caption: Caption, rng: np.random.Generator) -> list[str]:
    """Chunker-like `segs`: entity phrases, non-entity chunks, the whole caption, maybe a head noun."""
    segs = [p for p, _ in caption.mentions] + caption.chunks + [caption.text]
    if rng.random() < 0.3:
        segs.append(pick(rng, [p for p, _ in caption.mentions]).split()[-1])
    uniq = list(dict.fromkeys(segs))
    return [uniq[int(k)] for k in rng.permutation(len(uniq))]


def grounding_labels(scene: Scene, rng: np.random.Generator) -> list[str]:
    """One grounding label per entity (like a detector's class name): the shape word when it is the only
    one of its kind, otherwise (or at random) "colour shape"; unique within the scene."""
    out = []
    for e in scene.entities:
        unique = scene.shape_count(e.shape) == 1
        out.append(e.shape if unique and rng.random() < 0.5 else f"{e.colour} {e.shape}")
    return out


def preds_for(
    scene: Scene, caption: Caption, rng: np.random.Generator, labels: list[str]
) -> tuple[list[dict], list[tuple[str, int]]]:
    """GLIP-like `preds` (label -> score, with misses and "object" entries) and the entity each label grounds."""
    grounded: list[tuple[str, int]] = []
    if rng.random() >= PRED_EMPTY_PROB:
        for _, i in caption.mentions:
            if rng.random() >= PRED_MISS_PROB:
                grounded.append((labels[i], i))
    preds: list[dict] = [{label: float(rng.uniform(0.45, 0.9))} for label, _ in grounded]
    for _ in range(weighted_index(rng, (0.4, 0.4, 0.2))):
        pos = int(rng.integers(len(preds) + 1))
        preds.insert(pos, {"object": float(rng.uniform(0.4, 0.7))})
    return preds, grounded
