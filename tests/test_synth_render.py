"""Rasteriser of the synthetic world: shapes are distinct, coverage is where the entity is, masks are boxes."""

import itertools

import numpy as np
import pytest

from synth.render import (
    MASK_FILL_RAW,
    entity_alpha,
    mask_box,
    masked_copy,
    render_scene,
    shape_inside,
    to_storage,
)
from synth.world import SHAPES, Background, Entity, Scene

R = 64


def _grid(n=201):
    t = np.linspace(-1.5, 1.5, n)
    return np.meshgrid(t, t)


def test_every_shape_has_a_distinct_silhouette():
    u, v = _grid()
    masks = {s: shape_inside(s, u, v) for s in SHAPES}
    for s, m in masks.items():
        frac = m.mean()
        assert 0.05 < frac < 0.45, (s, frac)  # visible, but not a full square
    for a, b in itertools.combinations(SHAPES, 2):
        inter = np.logical_and(masks[a], masks[b]).sum()
        union = np.logical_or(masks[a], masks[b]).sum()
        assert inter / union < 0.8, (a, b, inter / union)


def test_unknown_shape_is_an_error():
    u, v = _grid(5)
    with pytest.raises(ValueError, match="hexagon"):
        shape_inside("hexagon", u, v)


def _scene(*entities, kind="flat"):
    bg = Background(kind=kind, base=(120.0, 120.0, 120.0), amp=20.0, theta=0.3, noise=4.0, seed=7)
    return Scene(R, list(entities), bg)


@pytest.mark.parametrize("shape", SHAPES)
def test_entity_pixels_are_its_colour_and_inside_its_bbox(shape):
    e = Entity(shape, "red", "large", 30.0, 34.0, 11.0, 0.1, (210, 30, 40))
    scene = _scene(e)
    out = render_scene(scene)
    img = out.image
    assert img.shape == (R, R, 3) and img.dtype == np.uint8
    exact = np.all(img == np.array(e.rgb, np.uint8), axis=-1)
    assert exact.sum() > 40  # a solid interior of exactly the entity colour
    x0, y0, x1, y1 = e.bbox
    ys, xs = np.nonzero(exact)
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    # the bbox is tight around the coverage and roughly centred on the entity
    a = out.alphas[0]
    assert a[y0:y1, x0:x1].sum() == pytest.approx(a.sum())
    assert abs((x0 + x1) / 2 - e.cx) < 4 and abs((y0 + y1) / 2 - e.cy) < 4


def test_render_is_a_pure_function_of_the_scene():
    e = Entity("star", "blue", "small", 20.0, 20.0, 6.5, -0.2, (30, 70, 220))
    for kind in ("flat", "linear", "radial", "blobs"):
        a = render_scene(_scene(e, kind=kind)).image
        b = render_scene(_scene(e, kind=kind)).image
        assert np.array_equal(a, b)


def test_later_entity_is_drawn_in_front_and_covers_are_recorded():
    back = Entity("square", "green", "large", 30.0, 30.0, 12.0, 0.0, (40, 160, 60))
    front = Entity("circle", "yellow", "small", 38.0, 30.0, 6.0, 0.0, (240, 200, 30))
    scene = _scene(back, front)
    img = render_scene(scene).image
    assert tuple(img[30, 38]) == front.rgb
    assert scene.covers == [(1, 0)]
    far = Entity("circle", "yellow", "small", 55.0, 8.0, 6.0, 0.0, (240, 200, 30))
    scene2 = _scene(back, far)
    render_scene(scene2)
    assert scene2.covers == []


def test_alpha_is_antialiased_at_the_border():
    e = Entity("circle", "white", "large", 32.3, 31.7, 11.4, 0.0, (250, 250, 250))
    a = entity_alpha(e, R)
    assert a.max() == 1.0 and a.min() == 0.0
    assert ((a > 0) & (a < 1)).sum() > 20


def test_mask_box_and_masked_copy_touch_only_the_box():
    e = Entity("triangle", "purple", "large", 20.0, 40.0, 11.0, 0.0, (135, 55, 175))
    scene = _scene(e)
    img = render_scene(scene).image
    box = mask_box(e, R)
    x0, y0, x1, y1 = box
    bx0, by0, bx1, by1 = e.bbox
    assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1
    m = masked_copy(img, [box])
    inside = np.zeros((R, R), bool)
    inside[y0:y1, x0:x1] = True
    assert np.array_equal(m[~inside], img[~inside])
    assert np.all(m[inside] == np.array(MASK_FILL_RAW, np.uint8))
    assert not np.any(np.all(m == np.array(e.rgb, np.uint8), axis=-1))  # the entity is gone
    assert np.array_equal(img, render_scene(scene).image)  # the original is untouched


def test_preprocessed_storage_is_clip_normalised_and_masks_to_zero():
    img = np.zeros((R, R, 3), np.uint8)
    img[..., 0] = 255
    x = to_storage(img, preprocessed=True)
    assert x.shape == (3, R, R) and x.dtype == np.float32
    assert x[0, 0, 0] == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-5)
    assert x[1, 0, 0] == pytest.approx(-0.4578275 / 0.26130258, rel=1e-5)
    m = masked_copy(x, [(2, 3, 10, 12)])
    assert np.all(m[:, 3:12, 2:10] == 0.0)
    assert np.array_equal(m[:, :3], x[:, :3])
    assert to_storage(img, preprocessed=False) is img
