"""The synthetic world: entity vocabulary, scene sampling, hard-negative partners, relations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "crescent",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
# half-extent of an entity as a fraction of the image side, per size class
HALF_EXTENT: dict[str, tuple[float, float]] = {"small": (0.09, 0.11), "large": (0.155, 0.185)}
COUNT_WEIGHTS: tuple[tuple[int, float], ...] = ((1, 0.15), (2, 0.35), (3, 0.30), (4, 0.20))
COLOUR_JITTER = 12
BACKGROUND_KINDS: tuple[str, ...] = ("flat", "linear", "radial", "blobs")
# probability that a scene gets a hard-negative partner right after it
PAIR_PROB = 0.3
# minimum centre distance between two entities, as a fraction of the sum of their half-extents
MIN_SEPARATION = 0.85

# relation thresholds (fractions of the image side)
AXIS_MIN = 0.2  # "left of"/"above": centre offset along the axis at least this
AXIS_DOMINANCE = 0.7  # ... and at least this fraction of the offset along the other axis
NEAR_FACTOR = 1.6  # "next to": centre distance at most this times the sum of half-extents
BETWEEN_MARGIN = 0.12
BETWEEN_VERTICAL = 0.3
REGION_LOW, REGION_HIGH = 0.36, 0.64
MIDDLE_LOW, MIDDLE_HIGH = 0.38, 0.62


@dataclass
class Entity:
    """One visual entity: a coloured shape of a size class at a position (pixel units)."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    half: float
    angle: float
    rgb: tuple[int, int, int]
    bbox: Optional[tuple[int, int, int, int]] = (
        None  # (x0, y0, x1, y1), end exclusive; set by render
    )

    def to_json(self) -> dict:
        """JSON-ready description (metadata files)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "center": [round(self.cx, 3), round(self.cy, 3)],
            "half": round(self.half, 3),
            "angle": round(self.angle, 4),
            "rgb": list(self.rgb),
            "bbox": list(self.bbox) if self.bbox is not None else None,
        }


@dataclass
class Background:
    """Parameters of a procedural background; rendering is a pure function of them."""

    kind: str
    base: tuple[float, float, float]
    amp: float
    theta: float
    noise: float
    seed: int

    def to_json(self) -> dict:
        """JSON-ready description (metadata files)."""
        return {
            "kind": self.kind,
            "base": [round(c, 2) for c in self.base],
            "amp": round(self.amp, 2),
            "theta": round(self.theta, 4),
            "noise": round(self.noise, 2),
            "seed": self.seed,
        }


@dataclass
class Scene:
    """Entities in drawing order (later ones in front) over a background."""

    resolution: int
    entities: list[Entity]
    background: Background
    partner: Optional[dict] = (
        None  # {"of": index of the scene it is a hard negative of, "kind": ...}
    )
    covers: list[tuple[int, int]] = field(
        default_factory=list
    )  # (front, back) pairs; set by render

    def shape_count(self, shape: str) -> int:
        """Number of entities with this shape."""
        return sum(e.shape == shape for e in self.entities)

    def size_shape_count(self, size: str, shape: str) -> int:
        """Number of entities with this size class and shape."""
        return sum(e.shape == shape and e.size == size for e in self.entities)

    def to_json(self) -> dict:
        """JSON-ready description (metadata files)."""
        return {
            "resolution": self.resolution,
            "entities": [e.to_json() for e in self.entities],
            "background": self.background.to_json(),
            "partner": self.partner,
            "covers": [list(c) for c in self.covers],
        }


def pick(rng: np.random.Generator, seq):
    """One element of `seq`, uniformly."""
    return seq[int(rng.integers(len(seq)))]


def weighted_index(rng: np.random.Generator, weights) -> int:
    """Index drawn with probability proportional to `weights` (cheaper than Generator.choice with p)."""
    x = rng.random() * sum(weights)
    acc = 0.0
    for k, w in enumerate(weights):
        acc += w
        if x < acc:
            return k
    return len(weights) - 1


def _jitter_rgb(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3).tolist()
    r, g, b = (min(255, max(0, c + d)) for c, d in zip(COLOURS[colour], jitter))
    return (r, g, b)


def sample_background(rng: np.random.Generator) -> Background:
    """A muted background (mid grey with a slight tint) so every entity colour stands out."""
    level = rng.uniform(80.0, 165.0)
    tint = rng.normal(0.0, 10.0, size=3)
    base = tuple(float(np.clip(level + t, 60.0, 185.0)) for t in tint)
    return Background(
        kind=pick(rng, BACKGROUND_KINDS),
        base=base,
        amp=float(rng.uniform(15.0, 45.0)),
        theta=float(rng.uniform(0.0, 2 * math.pi)),
        noise=float(rng.uniform(2.0, 8.0)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_specs(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """n (shape, colour, size) triples with no repeated (shape, colour) pair."""
    specs: list[tuple[str, str, str]] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n):
        shape = pick(rng, SHAPES)
        free = [c for c in COLOUR_NAMES if (shape, c) not in used]
        colour = pick(rng, free)
        used.add((shape, colour))
        specs.append((shape, colour, pick(rng, SIZES)))
    return specs


def layout(
    rng: np.random.Generator,
    specs: list[tuple[str, str, str]],
    resolution: int,
    rgbs: Optional[list[tuple[int, int, int]]] = None,
) -> list[Entity]:
    """Place entities (large ones first, so drawn behind) with limited overlap; drop what does not fit."""
    order = sorted(range(len(specs)), key=lambda k: specs[k][2] != "large")
    placed: list[Entity] = []
    for k in order:
        shape, colour, size = specs[k]
        lo, hi = HALF_EXTENT[size]
        half = float(rng.uniform(lo, hi)) * resolution
        margin = 1.15 * half + 1.0
        for _ in range(80):
            cx, cy = (float(v) for v in rng.uniform(margin, resolution - margin, size=2))
            if all(
                math.hypot(cx - e.cx, cy - e.cy) >= MIN_SEPARATION * (half + e.half) for e in placed
            ):
                break
        else:
            continue
        rgb = rgbs[k] if rgbs is not None else _jitter_rgb(rng, colour)
        placed.append(
            Entity(shape, colour, size, cx, cy, half, float(rng.uniform(-0.25, 0.25)), rgb)
        )
    return placed


def sample_scene(rng: np.random.Generator, resolution: int) -> Scene:
    """A random scene of 1-4 entities over a random background."""
    counts, weights = zip(*COUNT_WEIGHTS)
    n = counts[weighted_index(rng, weights)]
    entities = layout(rng, sample_specs(rng, n), resolution)
    return Scene(resolution, entities, sample_background(rng))


def sample_single(rng: np.random.Generator, shape: str, resolution: int) -> Scene:
    """A one-entity scene of the given shape (the Visual-Genome stand-in)."""
    colour = pick(rng, COLOUR_NAMES)
    size = "large" if rng.random() < 0.7 else "small"
    entities = layout(rng, [(shape, colour, size)], resolution)
    return Scene(resolution, entities, sample_background(rng))


def _specs(scene: Scene) -> list[tuple[str, str, str]]:
    return [(e.shape, e.colour, e.size) for e in scene.entities]


def binding_partner(rng: np.random.Generator, scene: Scene) -> Optional[Scene]:
    specs = _specs(scene)
    original = {(s, c) for s, c, _ in specs}
    for _ in range(30):
        perm = rng.permutation(len(specs))
        new = [(specs[k][0], specs[int(perm[k])][1], specs[k][2]) for k in range(len(specs))]
        pairs = [(s, c) for s, c, _ in new]
        if len(set(pairs)) == len(pairs) and set(pairs) != original:
            break
    else:
        return None
    if rng.random() < 0.6:  # same layout: only the colour-to-shape binding changes
        ents = [
            Entity(s, c, z, e.cx, e.cy, e.half, e.angle, _jitter_rgb(rng, c))
            for (s, c, z), e in zip(new, scene.entities)
        ]
        return Scene(scene.resolution, ents, scene.background)
    ents = layout(rng, new, scene.resolution)
    return Scene(scene.resolution, ents, sample_background(rng)) if len(ents) == len(new) else None


def size_partner(rng: np.random.Generator, scene: Scene) -> Optional[Scene]:
    specs = _specs(scene)
    if len({z for _, _, z in specs}) < 2:
        return None
    for _ in range(30):
        perm = rng.permutation(len(specs))
        new = [(specs[k][0], specs[k][1], specs[int(perm[k])][2]) for k in range(len(specs))]
        if sorted(new) != sorted(specs):
            break
    else:
        return None
    ents = layout(rng, new, scene.resolution)
    return Scene(scene.resolution, ents, scene.background) if len(ents) == len(new) else None


def mirror_partner(scene: Scene) -> Optional[Scene]:
    r = scene.resolution
    if not any(
        "left" in relations(a, b, r) for a in scene.entities for b in scene.entities if a is not b
    ):
        return None
    ents = [
        Entity(e.shape, e.colour, e.size, r - e.cx, e.cy, e.half, -e.angle, e.rgb)
        for e in scene.entities
    ]
    return Scene(r, ents, scene.background)


def recolour_partner(rng: np.random.Generator, scene: Scene) -> Scene:
    k = int(rng.integers(len(scene.entities)))
    used = {(e.shape, e.colour) for e in scene.entities}
    target = scene.entities[k]
    colour = pick(rng, [c for c in COLOUR_NAMES if (target.shape, c) not in used])
    ents = list(scene.entities)
    ents[k] = Entity(
        target.shape,
        colour,
        target.size,
        target.cx,
        target.cy,
        target.half,
        target.angle,
        _jitter_rgb(rng, colour),
    )
    return Scene(scene.resolution, ents, scene.background)


def make_partner(rng: np.random.Generator, scene: Scene, index: int) -> Scene:
    """A hard negative of `scene`: same objects with another attribute binding, sizes, or mirrored layout."""
    kinds = ["binding", "binding", "size", "mirror"] if len(scene.entities) >= 2 else ["recolour"]
    kind = pick(rng, kinds)
    partner = None
    if kind == "binding":
        partner = binding_partner(rng, scene)
    elif kind == "size":
        partner = size_partner(rng, scene)
    elif kind == "mirror":
        partner = mirror_partner(scene)
    if partner is None:
        kind, partner = "recolour", recolour_partner(rng, scene)
    partner.partner = {"of": index, "kind": kind}
    return partner


def relations(a: Entity, b: Entity, resolution: int) -> list[str]:
    """Spatial relations that hold for `a` relative to `b` ("left" = a is left of b)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    lim = AXIS_MIN * resolution
    out = []
    if dx >= lim and dx >= AXIS_DOMINANCE * abs(dy):
        out.append("left")
    if -dx >= lim and -dx >= AXIS_DOMINANCE * abs(dy):
        out.append("right")
    if dy >= lim and dy >= AXIS_DOMINANCE * abs(dx):
        out.append("above")
    if -dy >= lim and -dy >= AXIS_DOMINANCE * abs(dx):
        out.append("below")
    if math.hypot(dx, dy) <= NEAR_FACTOR * (a.half + b.half):
        out.append("near")
    return out


def between(a: Entity, b: Entity, c: Entity, resolution: int) -> bool:
    """True when `a` lies horizontally between `b` and `c`, roughly on their level."""
    lo, hi = sorted((b.cx, c.cx))
    m = BETWEEN_MARGIN * resolution
    v = BETWEEN_VERTICAL * resolution
    return lo + m < a.cx < hi - m and abs(a.cy - b.cy) < v and abs(a.cy - c.cy) < v


def regions(e: Entity, resolution: int) -> list[str]:
    """Absolute image regions the entity's centre is clearly in."""
    x, y = e.cx / resolution, e.cy / resolution
    horiz = "left" if x < REGION_LOW else "right" if x > REGION_HIGH else None
    vert = "top" if y < REGION_LOW else "bottom" if y > REGION_HIGH else None
    out = [r for r in (horiz, vert) if r]
    if horiz and vert:
        out.append(f"{vert} {horiz}")
    if MIDDLE_LOW < x < MIDDLE_HIGH and MIDDLE_LOW < y < MIDDLE_HIGH:
        out.append("middle")
    return out


def iter_split_scenes(seed: int, split_code: int, n: int, resolution: int):
    """Yield (index, scene, rng) for a split; each index has its own stream, partners follow their scene."""
    prev: Optional[Scene] = None
    want_partner = False
    for i in range(n):
        rng = np.random.default_rng([seed, split_code, i])
        if want_partner and prev is not None:
            scene = make_partner(rng, prev, i - 1)
            want_partner = False
        else:
            scene = sample_scene(rng, resolution)
            want_partner = bool(rng.random() < PAIR_PROB)
        prev = scene
        yield i, scene, rng
