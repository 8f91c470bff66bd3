"""Spec 3.1 example construction, per-flag file loading and input errors of the training data."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_data import make_dataset, one_torch_thread  # noqa: F401 (autouse fixture)
from agree.entities import training_slots
from agree.io import InputError
from clip.clip import tokenize
from clip.transform import array_to_tensor
from training import data as D
from training import dataset as DS
from training import validation as V
from training.params import parse_args
from training.terms import enabled_terms

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_images=4, caps_per_image=1, n_val=2)


def _texts(caption, segs):
    slots = training_slots(caption, segs)
    return slots.prompts, slots.masked


def _args(paths, *flags):
    return parse_args(["--train-data", str(paths["train"]), "--model", "tiny", *flags])


def _dataset(paths, *flags, augment=False):
    args = _args(paths, *flags)
    dset = DS.build_train_dataset(args, D.resolve_paths(args), enabled_terms(args), 64)
    dset.augment = augment
    return dset


@pytest.mark.parametrize("layout", ["hwc_uint8", "chw_float"])
def test_zero_square_is_32x32_in_the_stored_space_and_clipped(layout):
    rng = np.random.default_rng(0)
    arr = np.full((64, 64, 3), 200, np.uint8) if layout == "hwc_uint8" else np.ones((3, 64, 64), np.float32)
    sizes = set()
    for _ in range(50):
        out = DS.zero_square(arr, rng)
        zero = (out == 0).all(axis=2 if layout == "hwc_uint8" else 0)
        ys, xs = np.nonzero(zero)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert zero.sum() == h * w and h <= 32 and w <= 32
        assert (h == 32 or ys.max() == 63) and (w == 32 or xs.max() == 63)   # only the border clips it
        sizes.add((h, w))
    assert (arr != 0).all()          # the input is untouched
    assert (32, 32) in sizes and len(sizes) > 1


def test_example_has_only_what_the_enabled_terms_need(ds):
    plain = _dataset(ds)[0]
    assert set(plain) == {"image", "text"}
    assert plain["image"].shape == (3, 64, 64) and plain["text"].shape == (77,)
    assert set(_dataset(ds, "--is-prompt")[0]) == {"image", "text", "prompts", "masked"}
    assert set(_dataset(ds, "--is-da-loss")[0]) == {"image", "text", "vg_image", "vg_text"}
    assert set(_dataset(ds, "--is-da-mask")[0]) == {"image", "text", "vg_image", "vg_image_masked", "vg_text"}
    assert set(_dataset(ds, "--is-vg")[0]) == {"image", "text", "grounding_masked"}


def test_example_contents_follow_spec_3_1(ds):
    dset = _dataset(ds, "--is-prompt", "--is-mask", "--is-da-loss", "--is-da-mask", "--is-vg")
    rec = json.loads(ds["train"].read_text().splitlines()[0])
    ex = dset[0]
    train_npz = np.load(ds["train_images"])
    image = array_to_tensor(train_npz[str(rec["image_id"])], 64)
    assert torch.equal(ex["image"], image)
    assert torch.equal(ex["text"], tokenize([rec["caption"]])[0])
    prompts, masked = _texts(rec["caption"], rec["segs"])
    assert prompts[2:] == ["", "", ""]    # the third seg is too long: two entities, three pads
    assert torch.equal(ex["prompts"], tokenize(prompts))
    assert torch.equal(ex["masked"], tokenize(masked))
    # VG pair: the first image lists 'shirt' (usable) and 'unicorn' (only an empty region)
    vg = np.load(ds["vg_images"])
    vg_masked = np.load(ds["vg_mask_images"])
    assert torch.equal(ex["vg_text"], tokenize(["a photo containing shirt"])[0])
    candidates = {g: array_to_tensor(vg[g], 64) for g in ("2000", "2001")}
    chosen = [g for g, t in candidates.items() if torch.equal(ex["vg_image"], t)]
    assert len(chosen) == 1
    assert torch.equal(ex["vg_image_masked"], array_to_tensor(vg_masked[f"shirt_{chosen[0]}"], 64))
    # grounding: first non-'object' label of preds
    ground = np.load(ds["grounding"])
    stem = Path(rec["image"]).stem
    label = [k for p in rec["preds"] for k in p if k != "object"][0]
    assert torch.equal(ex["grounding_masked"], array_to_tensor(ground[f"{stem}_{label}"], 64))


def test_fallbacks_when_no_vg_object_and_no_grounding_label(ds, tmp_path):
    dset = _dataset(ds, "--is-da-loss", "--is-da-mask", "--is-vg")
    last = len(dset) - 1            # its only object, 'unicorn', has no usable VG region
    dset.records[last].grounding_key = None    # as if preds held only 'object'
    ex = dset[last]
    assert torch.equal(ex["vg_image"], ex["image"])
    assert torch.equal(ex["vg_text"], ex["text"])
    for key in ("vg_image_masked", "grounding_masked"):
        diff = (ex[key] != ex["image"]).any(0)
        ys, xs = np.nonzero(diff.numpy())
        assert 0 < diff.sum() <= 32 * 32
        assert ys.max() - ys.min() < 32 and xs.max() - xs.min() < 32


def test_randomness_is_seeded_by_seed_epoch_index(ds):
    dset = _dataset(ds, "--is-da-mask", augment=True)
    a = dset[1]
    again = dset[1]
    for k in a:
        assert torch.equal(a[k], again[k])
    other_epochs = []
    for e in range(1, 6):
        dset.set_epoch(e)
        other_epochs.append(dset[1])
    assert any(not torch.equal(a["image"], b["image"]) for b in other_epochs)   # crops change with the epoch
    assert any(not torch.equal(a["vg_image"], b["vg_image"]) for b in other_epochs)
    # the global torch RNG is left alone by augmentation
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    dset[0]
    assert torch.equal(torch.rand(1), before)


def test_each_flag_loads_only_its_files(ds, tmp_path):
    # --is-vg alone needs no Visual Genome file; --is-da-loss needs no masked VG archive
    args = _args(ds, "--is-vg", "--vg-root", str(tmp_path / "nowhere"))
    D.check_files(args, enabled_terms(args), D.resolve_paths(args))
    args = _args(ds, "--is-da-loss", "--vg-mask-images", str(tmp_path / "absent.npz"),
                 "--grounding-images", str(tmp_path / "absent.npz"))
    D.check_files(args, enabled_terms(args), D.resolve_paths(args))
    assert "vg_image" in DS.build_train_dataset(args, D.resolve_paths(args), enabled_terms(args), 64)[0]
    # the files a flag needs are required, and the error names the flag and the path
    for flag, override in (("--is-da-mask", "--vg-mask-images"), ("--is-vg", "--grounding-images"),
                           ("--is-da-loss", "--vg-vocab"), ("--is-da-mask", "--train-objects")):
        missing = tmp_path / f"missing_{override[2:]}"
        args = _args(ds, flag, override, str(missing))
        with pytest.raises(InputError, match=f"{flag}.*{missing}"):
            D.check_files(args, enabled_terms(args), D.resolve_paths(args))


def test_default_paths_follow_the_release_layout(ds):
    args = _args(ds, "--is-da-mask", "--is-vg")
    p = D.resolve_paths(args)
    assert p.train_images == ds["train_images"] and p.grounding_images == ds["grounding"]
    assert p.vg_images == ds["vg_images"] and p.vg_vocab == ds["vg_vocab"] and p.train_objects == ds["objects"]
    assert p.val_images == ds["val_images"]


def test_malformed_line_names_file_and_line(ds, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = ds["train"].read_text().splitlines()
    bad.write_text(lines[0] + "\n" + "{not json\n")
    with pytest.raises(InputError, match=f"{bad}:2"):
        D.load_train_records(bad, "image", "caption", False, False)
    bad.write_text(json.dumps({"image": "a.jpg", "image_id": 1}) + "\n")
    with pytest.raises(InputError, match=f"{bad}:1.*'caption'"):
        D.load_train_records(bad, "image", "caption", False, False)
    rec = json.loads(lines[0])
    rec["segs"] = "not a list"
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(InputError, match=f"{bad}:1.*segs"):
        D.load_train_records(bad, "image", "caption", True, False)


def test_missing_train_image_is_reported(ds, tmp_path):
    bad = tmp_path / "train.jsonl"
    rec = json.loads(ds["train"].read_text().splitlines()[0])
    rec["image_id"] = 999
    bad.write_text(json.dumps(rec) + "\n")
    args = _args(ds, "--train-images", str(ds["train_images"]))
    args.train_data = str(bad)
    with pytest.raises(InputError, match="'999'"):
        DS.build_train_dataset(args, D.resolve_paths(args), (), 64)


def test_val_data_keys_images_by_index(ds):
    val = V.load_val(ds["val"], ds["val_images"], "caption")
    assert val.keys == ["0", "1"]
    assert len(val.captions) == 10 and val.caption_image == [0] * 5 + [1] * 5


def test_cli_reports_bad_input_without_traceback(ds, tmp_path):
    missing = tmp_path / "no_grounding.npz"
    cmd = [PY, str(ROOT / "training" / "main_all.py"), "--train-data", str(ds["train"]), "--model", "tiny",
           "--is-vg", "--grounding-images", str(missing), "--logs", str(tmp_path / "logs"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--is-vg" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "logs").exists()
