"""Numpy rasteriser for synthetic scenes, box masking, and the two on-disk image formats."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from synth.world import Entity, Scene

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# raw-uint8 fill of masked boxes: CLIP's mean colour, i.e. ~0 once normalised
MASK_FILL_RAW: tuple[int, int, int] = tuple(
    int(round(m * 255)) for m in CLIP_MEAN
)  # (123, 117, 104)
MASK_FILL_PREPROCESSED = 0.0
SUPERSAMPLE = 3
COVER_MIN_PIXELS = 4  # overlap needed before "a in front of b" is claimed

_STAR = [
    (
        math.cos(-math.pi / 2 + k * math.pi / 5) * (1.0 if k % 2 == 0 else 0.42),
        math.sin(-math.pi / 2 + k * math.pi / 5) * (1.0 if k % 2 == 0 else 0.42),
    )
    for k in range(10)
]
_TRIANGLE = [(0.0, -1.0), (0.97, 0.72), (-0.97, 0.72)]


def _in_polygon(u: np.ndarray, v: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    n = len(verts)
    for k in range(n):
        x1, y1 = verts[k]
        x2, y2 = verts[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        x_at = x1 + (x2 - x1) * (v - y1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of points (u, v), in units of the entity's half-extent (v down), inside the shape."""
    r2 = u * u + v * v
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.52**2)
    if shape == "square":
        return np.maximum(au, av) <= 0.82
    if shape == "diamond":
        return au + av <= 1.05
    if shape == "cross":
        return ((au <= 0.32) & (av <= 1.0)) | ((av <= 0.32) & (au <= 1.0))
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.78**2)
    if shape == "star":
        return _in_polygon(u, v, _STAR)
    if shape == "triangle":
        return _in_polygon(u, v, _TRIANGLE)
    raise ValueError(f"unknown shape {shape!r}")


def _alpha_window(e: Entity, resolution: int, supersample: int) -> tuple[np.ndarray, int, int]:
    """Coverage on the window around the entity: (alpha (h, w), x0, y0)."""
    reach = 1.3 * e.half + 1.0
    x0, x1 = (
        max(0, int(math.floor(e.cx - reach))),
        min(resolution, int(math.ceil(e.cx + reach)) + 1),
    )
    y0, y1 = (
        max(0, int(math.floor(e.cy - reach))),
        min(resolution, int(math.ceil(e.cy + reach)) + 1),
    )
    if x0 >= x1 or y0 >= y1:
        return np.zeros((0, 0), np.float32), 0, 0
    offs = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample
    xs = ((np.arange(x0, x1, dtype=np.float32)[:, None] + offs[None, :]).ravel() - e.cx) / e.half
    ys = ((np.arange(y0, y1, dtype=np.float32)[:, None] + offs[None, :]).ravel() - e.cy) / e.half
    c, s = np.float32(math.cos(e.angle)), np.float32(math.sin(e.angle))
    u = xs[None, :] * c + ys[:, None] * s
    v = ys[:, None] * c - xs[None, :] * s
    inside = shape_inside(e.shape, u, v)
    h, w = y1 - y0, x1 - x0
    cov = inside.reshape(h, supersample, w, supersample).sum(axis=(1, 3), dtype=np.float32)
    return cov / np.float32(supersample * supersample), x0, y0


def entity_alpha(e: Entity, resolution: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Coverage in [0, 1] of every pixel by the entity (anti-aliased by supersampling), shape (R, R)."""
    alpha = np.zeros((resolution, resolution), dtype=np.float32)
    win, x0, y0 = _alpha_window(e, resolution, supersample)
    alpha[y0 : y0 + win.shape[0], x0 : x0 + win.shape[1]] = win
    return alpha


@functools.lru_cache(maxsize=8)
def _unit_grid(r: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float32) / np.float32(max(r - 1, 1))
    return yy, xx


@functools.lru_cache(maxsize=8)
def _interp_matrix(g: int, r: int) -> np.ndarray:
    """(r, g) matrix of bilinear weights taking g coarse samples (spanning the image) to r pixels."""
    pos = (np.arange(r) + 0.5) / r * (g - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, g - 2)
    t = pos - i0
    w = np.zeros((r, g), np.float32)
    w[np.arange(r), i0] = 1 - t
    w[np.arange(r), i0 + 1] = t
    return w


def render_background(scene: Scene) -> np.ndarray:
    """Background as float32 (3, R, R) in 0-255, a pure function of the scene's background parameters."""
    bg, r = scene.background, scene.resolution
    rng = np.random.default_rng(bg.seed)
    base = np.array(bg.base, dtype=np.float32)[:, None, None]
    yy, xx = _unit_grid(r)
    if bg.kind == "blobs":  # smooth random colour field
        coarse = rng.normal(0.0, 0.45, size=(3, 4, 4)).astype(np.float32)
        w = _interp_matrix(4, r)
        img = base + np.float32(bg.amp) * (w @ coarse @ w.T)
    else:
        if bg.kind == "flat":
            field = np.zeros((r, r), np.float32)
        elif bg.kind == "linear":
            field = (
                (xx - 0.5) * math.cos(bg.theta) + (yy - 0.5) * math.sin(bg.theta)
            ) * np.float32(1.4)
        else:  # radial
            cx, cy = 0.5 + 0.3 * math.cos(bg.theta), 0.5 + 0.3 * math.sin(bg.theta)
            field = np.hypot(xx - np.float32(cx), yy - np.float32(cy)) - np.float32(0.5)
        direction = np.array(
            [1.0, 0.9 + 0.2 * math.sin(bg.theta), 0.9 + 0.2 * math.cos(bg.theta)], np.float32
        )
        img = base + (np.float32(bg.amp) * direction)[:, None, None] * field[None]
    img += rng.standard_normal((3, r, r), dtype=np.float32) * np.float32(bg.noise)
    np.clip(img, 0.0, 255.0, out=img)
    return img


@dataclass
class Rendered:
    """A rendered scene: the uint8 (R, R, 3) image and each entity's coverage map."""

    image: np.ndarray
    alphas: list[np.ndarray]


def render_scene(scene: Scene) -> Rendered:
    """Rasterise the scene (painter's order); also sets each entity's bbox and the scene's covers."""
    r = scene.resolution
    img = render_background(scene)
    alphas = []
    for e in scene.entities:
        win, x0, y0 = _alpha_window(e, r, SUPERSAMPLE)
        ys, xs = np.nonzero(win > 0)
        e.bbox = (
            x0 + int(xs.min()),
            y0 + int(ys.min()),
            x0 + int(xs.max()) + 1,
            y0 + int(ys.max()) + 1,
        )
        h, w = win.shape
        sub = img[:, y0 : y0 + h, x0 : x0 + w]
        sub += (np.array(e.rgb, dtype=np.float32)[:, None, None] - sub) * win[None]
        full = np.zeros((r, r), np.float32)
        full[y0 : y0 + h, x0 : x0 + w] = win
        alphas.append(full)
    scene.covers = []
    for i, ei in enumerate(scene.entities):
        for j in range(i):
            bi, bj = ei.bbox, scene.entities[j].bbox
            if bi[0] >= bj[2] or bj[0] >= bi[2] or bi[1] >= bj[3] or bj[1] >= bi[3]:
                continue
            if int(np.count_nonzero((alphas[i] > 0.5) & (alphas[j] > 0.5))) >= COVER_MIN_PIXELS:
                scene.covers.append((i, j))
    image = np.ascontiguousarray(np.rint(img).astype(np.uint8).transpose(1, 2, 0))
    return Rendered(image, alphas)


def mask_box(e: Entity, resolution: int, pad: int = 1) -> tuple[int, int, int, int]:
    """The box a grounding model would report for the entity: its bbox grown by `pad`, clipped."""
    assert e.bbox is not None, "render the scene first"
    x0, y0, x1, y1 = e.bbox
    return (
        max(0, x0 - pad),
        max(0, y0 - pad),
        min(resolution, x1 + pad),
        min(resolution, y1 + pad),
    )


def to_storage(image: np.ndarray, preprocessed: bool) -> np.ndarray:
    """uint8 (R, R, 3) as is, or float32 (3, R, R) normalised with CLIP's mean and std."""
    if not preprocessed:
        return image
    x = image.astype(np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def masked_copy(stored: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Copy of a stored image with each box filled (CLIP mean colour for uint8, 0 for preprocessed)."""
    out = stored.copy()
    for x0, y0, x1, y1 in boxes:
        if out.dtype == np.uint8:
            out[y0:y1, x0:x1, :] = np.array(MASK_FILL_RAW, dtype=np.uint8)
        else:
            out[:, y0:y1, x0:x1] = MASK_FILL_PREPROCESSED
    return out
