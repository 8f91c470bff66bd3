"""The twin split: caption a is true of image A and false of image B (and the reverse), files are deterministic."""

import json
import re

import numpy as np
import pytest

from agree.images import ImageArchive
from synth.twins import TWIN_KINDS, TwinFiles, make_twin, write_twins
from synth.world import relations

PHRASE = re.compile(r"a (small|large) (\w+) (\w+)")
MIRROR = re.compile(r"a (\w+) (\w+) (?:to the )?(left|right) of a (\w+) (\w+)\.")


def _holds(caption: str, scene) -> bool:
    """An independent reading of a twin caption against a scene's entities."""
    m = MIRROR.fullmatch(caption)
    if m:
        c1, s1, side, c2, s2 = m.groups()
        x = next((e for e in scene.entities if (e.colour, e.shape) == (c1, s1)), None)
        y = next((e for e in scene.entities if (e.colour, e.shape) == (c2, s2)), None)
        return x is not None and y is not None and side in relations(x, y, scene.resolution)
    phrases = PHRASE.findall(caption)
    assert phrases, caption
    have = {(e.size, e.colour, e.shape) for e in scene.entities}
    return all(p in have for p in phrases)


@pytest.mark.parametrize("kind", TWIN_KINDS)
def test_each_caption_is_true_of_its_image_only(kind):
    for i in range(40):
        a, b, text_a, text_b = make_twin(kind, 3, i, 64)
        assert text_a != text_b
        assert _holds(text_a, a) and _holds(text_b, b), (text_a, text_b)
        assert not _holds(text_a, b) and not _holds(text_b, a), (text_a, text_b)


def test_twin_captions_use_the_same_words_for_binding_and_mirror():
    for kind in ("binding", "mirror"):
        for i in range(20):
            _, _, text_a, text_b = make_twin(kind, 0, i, 64)
            assert sorted(text_a.split()) == sorted(text_b.split()) or kind == "mirror"
            assert len(text_a.split()) == len(text_b.split())


def test_write_twins_is_deterministic_and_complete(tmp_path):
    counts = write_twins(tmp_path / "x", seed=1, per_kind=3, resolution=64)
    write_twins(tmp_path / "y", seed=1, per_kind=3, resolution=64)
    fx, fy = TwinFiles(tmp_path / "x"), TwinFiles(tmp_path / "y")
    for name in ("images", "texts", "pairs"):
        assert getattr(fx, name).read_bytes() == getattr(fy, name).read_bytes()
    assert counts == {k: 3 for k in TWIN_KINDS}
    pairs = [json.loads(line) for line in fx.pairs.read_text().splitlines()]
    texts = {json.loads(line)["query_id"] for line in fx.texts.read_text().splitlines()}
    archive = ImageArchive(fx.images)
    assert len(pairs) == 12 and len(texts) == 24 and len(archive) == 24
    for p in pairs:
        assert {p["text_a"], p["text_b"]} <= texts
        a, b = archive[str(p["image_a"])], archive[str(p["image_b"])]
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)
