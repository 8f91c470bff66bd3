"""Generator behaviour: deterministic per seed, split-stable, all-or-nothing output, command-line flags."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import synth.captions
from agree.images import BoxMasks, ImageArchive
from agree.masks import MaskBoxes
from dataprep.images import Storage
from synth.render import to_storage
from synth.writer import SynthConfig, SynthLayout, generate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_synthetic_dataset.py"
TINY = dict(train_images=8, val_images=3, test_images=4, pretrain_images=5, vg_per_object=2)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _gen(root: Path, **kw) -> SynthLayout:
    cfg = {**TINY, **kw}
    generate(SynthConfig(out=root, **cfg), progress=False)
    return SynthLayout.under(root)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = _files(_gen(tmp_path / "a", seed=11).root)
    b = _files(_gen(tmp_path / "b", seed=11).root)
    assert len(a) >= 20
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_different_seeds_differ(tmp_path):
    a = _gen(tmp_path / "a", seed=1)
    b = _gen(tmp_path / "b", seed=2)
    for path in ("train_jsonl", "train_npz", "test_npz", "test_texts", "vg_images", "pretrain_npz"):
        assert getattr(a, path).read_bytes() != getattr(b, path).read_bytes(), path
    za, zb = np.load(a.train_npz), np.load(b.train_npz)
    assert not np.array_equal(za["0"], zb["0"])


def test_test_split_does_not_depend_on_other_split_sizes(tmp_path):
    a = _gen(tmp_path / "a", seed=5, train_images=3, pretrain_images=0)
    b = _gen(tmp_path / "b", seed=5, train_images=9, val_images=5)
    for path in ("test_npz", "test_texts", "test_images", "test_segs", "vg_vocab", "vg_images"):
        assert getattr(a, path).read_bytes() == getattr(b, path).read_bytes(), path
    assert not a.pretrain_jsonl.exists() and b.pretrain_jsonl.exists()


def test_failure_leaves_no_files(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth.captions.target_captions

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > TINY["train_images"] + 1:  # fail inside the val split
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth.captions, "target_captions", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        generate(SynthConfig(out=out, **TINY), progress=False)
    assert calls["n"] == TINY["train_images"] + 2
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_failure_does_not_clobber_a_previous_dataset(tmp_path, monkeypatch):
    lay = _gen(tmp_path / "d", seed=4)
    before = _files(lay.root)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(synth.captions, "pretrain_captions", broken)
    with pytest.raises(RuntimeError):
        generate(SynthConfig(out=lay.root, seed=99, **TINY), progress=False)
    assert _files(lay.root) == before


@pytest.mark.parametrize(
    "field,value",
    [("val_images", 0), ("train_captions", 0), ("resolution", 16), ("pretrain_images", -1)],
)
def test_bad_config_is_a_clear_error_before_any_file(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"SynthConfig.{field} must be"):
        generate(SynthConfig(out=tmp_path / "x", **{**TINY, field: value}), progress=False)
    assert not (tmp_path / "x").exists()


def test_regenerating_in_place_equals_a_fresh_run(tmp_path):
    _gen(tmp_path / "d", seed=4)
    again = _files(_gen(tmp_path / "d", seed=5, pretrain_images=0).root)
    fresh = _files(_gen(tmp_path / "f", seed=5, pretrain_images=0).root)
    assert again == fresh and not any(name.startswith("pretrain/") for name in again)


def _stored(lay, path):
    """The arrays of an archive of the layout; the masks (written as boxes) drawn over their images."""
    if path in ("grounding", "vg_masked"):
        boxes, images = {
            "grounding": (lay.grounding_boxes, lay.train_npz),
            "vg_masked": (lay.vg_mask_boxes, lay.vg_images),
        }[path]
        m = BoxMasks(MaskBoxes(boxes), ImageArchive(images))
        return {k: m[k] for k in m.boxes.keys()}
    z = np.load(getattr(lay, path))
    return {k: z[k] for k in z.files}


def test_preprocessed_arrays_are_the_normalised_raw_arrays(tmp_path):
    raw = _gen(tmp_path / "raw", seed=8, pretrain_images=0)
    pre = _gen(tmp_path / "pre", seed=8, pretrain_images=0, preprocessed=True)
    storage = Storage.from_clip("float32")
    fill = storage.encode(np.array([[storage.fill]], np.uint8))[:, 0, 0]
    for path in ("train_npz", "test_npz", "grounding", "vg_images", "vg_masked"):
        zr, zp = _stored(raw, path), _stored(pre, path)
        assert list(zr) == list(zp)
        for k in zr:
            a, b = zr[k], zp[k]
            assert b.dtype == np.float32 and b.shape == (3, 64, 64)
            assert np.array_equal(
                b, storage.encode(a)
            )  # prepare_data's float32 storage of the same pixels
            assert np.allclose(b, to_storage(a, preprocessed=True), atol=1e-6)
            if path in ("grounding", "vg_masked"):
                assert np.all(
                    b == fill[:, None, None], axis=0
                ).any()  # the masked box: CLIP's mean colour, ~0
    assert np.abs(fill).max() < 0.02
    assert raw.train_jsonl.read_bytes() == pre.train_jsonl.read_bytes()


def test_other_resolutions_scale_the_scene(tmp_path):
    lay = _gen(tmp_path / "r", resolution=96, train_images=2, test_images=2, pretrain_images=0)
    z = np.load(lay.test_npz)
    assert all(z[k].shape == (96, 96, 3) for k in z.files)


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd="/", timeout=120
    )


def test_cli_writes_dataset_and_prints_summary(tmp_path):
    out = tmp_path / "cli"
    res = _run(
        "--out",
        str(out),
        "--seed",
        "2",
        "--num-train-images",
        "4",
        "--num-val-images",
        "2",
        "--num-test-images",
        "3",
        "--num-pretrain-images",
        "2",
        "--vg-per-object",
        "1",
        "--train-captions",
        "2",
        "--quiet",
    )
    assert res.returncode == 0, res.stderr
    assert "synthetic dataset written" in res.stdout
    assert "3 images, 15 queries" in res.stdout and "4 images, 8 captions" in res.stdout
    lay = SynthLayout.under(out)
    assert str(lay.train_jsonl) in res.stdout
    assert len(lay.train_jsonl.read_text().splitlines()) == 8
    assert lay.world.is_file()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--num-train-images", "0"),
        ("--train-images", "0"),  # the earlier name, still accepted
        ("--resolution", "16"),
        ("--seed", "-1"),
        ("--train-captions", "6"),
        ("--num-test-images", "many"),
    ],
)
def test_cli_rejects_bad_flags_by_name(tmp_path, flag, value):
    res = _run("--out", str(tmp_path / "x"), flag, value)
    assert res.returncode == 2
    assert flag in res.stderr
    assert not (tmp_path / "x").exists()


def test_cli_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    res = _run("--out", str(f))
    assert res.returncode == 2 and "--out" in res.stderr and "Traceback" not in res.stderr
