"""The training example (docs/method.md §1): its construction, per-flag file loading, input errors."""

import json
import logging
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
from training.distributed import DistEnv
from training.engine import run
from training.params import parse_args
from training.slots import zero_square
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
    dset.augment = "random-resized-crop" if augment else "none"
    return dset


def test_zero_square_is_32x32_of_the_mean_colour_in_normalised_space_and_clipped():
    rng = np.random.default_rng(0)
    arr = np.ones((3, 64, 64), np.float32)
    sizes = set()
    for _ in range(50):
        out = zero_square(arr, rng)
        zero = (out == 0).all(axis=0)  # 0 after normalisation is exactly CLIP's mean colour
        ys, xs = np.nonzero(zero)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert zero.sum() == h * w and h <= 32 and w <= 32
        assert (h == 32 or ys.max() == 63) and (
            w == 32 or xs.max() == 63
        )  # only the border clips it
        assert (out[:, ~zero] == 1).all()
        sizes.add((h, w))
    assert (arr != 0).all()  # the input is untouched
    assert (32, 32) in sizes and len(sizes) > 1


def test_example_has_only_what_the_enabled_terms_need(ds):
    plain = _dataset(ds)[0]
    assert set(plain) == {"image", "text"}
    assert plain["image"].shape == (3, 64, 64) and plain["text"].shape == (77,)
    assert set(_dataset(ds, "--is-prompt")[0]) == {"image", "text", "prompts"}
    assert set(_dataset(ds, "--is-mask")[0]) == {"image", "text", "masked"}
    assert set(_dataset(ds, "--is-da-loss")[0]) == {"image", "text", "vg_image", "vg_text"}
    assert set(_dataset(ds, "--is-da-mask")[0]) == {
        "image",
        "text",
        "vg_image",
        "vg_image_masked",
        "vg_text",
    }
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
    assert prompts[2:] == ["", "", ""]  # the third seg is too long: two entities, three pads
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
    last = len(dset) - 1  # its only object, 'unicorn', has no usable VG region
    dset.records[last].grounding_key = None  # as if preds held only 'object'
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
    assert any(
        not torch.equal(a["image"], b["image"]) for b in other_epochs
    )  # crops change with the epoch
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
    args = _args(
        ds,
        "--is-da-loss",
        "--vg-mask-images",
        str(tmp_path / "absent.npz"),
        "--grounding-images",
        str(tmp_path / "absent.npz"),
    )
    D.check_files(args, enabled_terms(args), D.resolve_paths(args))
    assert (
        "vg_image"
        in DS.build_train_dataset(args, D.resolve_paths(args), enabled_terms(args), 64)[0]
    )
    # the files a flag needs are required, and the error names the flag and the path
    for flag, override in (
        ("--is-da-mask", "--vg-mask-images"),
        ("--is-vg", "--grounding-images"),
        ("--is-da-loss", "--vg-vocab"),
        ("--is-da-mask", "--train-objects"),
    ):
        missing = tmp_path / f"missing_{override[2:]}"
        args = _args(ds, flag, override, str(missing))
        with pytest.raises(InputError, match=f"{flag}.*{missing}"):
            D.check_files(args, enabled_terms(args), D.resolve_paths(args))


def test_default_paths_follow_the_release_layout(ds):
    args = _args(ds, "--is-da-mask", "--is-vg")
    p = D.resolve_paths(args)
    assert p.train_images == ds["train_images"] and p.grounding_images == ds["grounding"]
    assert p.vg_images == ds["vg_images"] and p.vg_vocab == ds["vg_vocab"]
    assert p.train_objects == (
        ds["objects"],
        ds["objects_test"],
        ds["objects_val"],
    )  # the release's order
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
    cmd = [
        PY,
        str(ROOT / "training" / "main_all.py"),
        "--train-data",
        str(ds["train"]),
        "--model",
        "tiny",
        "--is-vg",
        "--grounding-images",
        str(missing),
        "--logs",
        str(tmp_path / "logs"),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--is-vg" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- missing inputs (--max-missing-fraction)
def _without(src: Path, dst: Path, drop: set) -> Path:
    """A copy of an .npz archive without the keys in `drop`."""
    with np.load(src) as z:
        np.savez(dst, **{k: z[k] for k in z.files if k not in drop})
    return dst


def _inputs(paths, *flags):
    args = _args(paths, *flags)
    return DS.load_train_inputs(args, D.resolve_paths(args), enabled_terms(args))


def test_complete_data_passes_the_check_and_reports_the_spec_fallbacks(ds):
    inputs = _inputs(ds, "--is-da-mask", "--is-vg")
    report = "\n".join(m for _, m in inputs.report)
    assert all(level == logging.INFO for level, _ in inputs.report)
    assert "grounding image: 0 of 4 captions with a grounded label missing" in report
    assert "objects line: 0 of 4 train images missing" in report
    # shirt, ball, tree: two usable entries each ('unicorn' has only an empty one, 'thing' no vocabulary line)
    assert "Visual Genome image: 0 of 6 usable VG entries" in report
    assert "Visual Genome masked image: 0 of 6" in report
    assert (
        "1 of 4 captions' images list no object with a usable VG entry" in report
    )  # the documented fallback (docs/method.md §1.3)
    assert "0 of 4 captions have no grounded label" in report


def test_caption_without_grounded_label_is_the_spec_fallback_not_a_miss(ds, tmp_path):
    lines = [json.loads(x) for x in ds["train"].read_text().splitlines()]
    lines[2]["preds"] = [{"object": 0.9}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = _args(ds, "--is-vg", "--data-root", str(ds["data_root"]))
    args.train_data = str(train)
    inputs = DS.load_train_inputs(args, D.resolve_paths(args), enabled_terms(args))
    report = "\n".join(m for _, m in inputs.report)
    assert (
        "0 of 3 captions with a grounded label missing" in report
        and "1 of 4 captions have no grounded" in report
    )


def test_missing_grounding_image_stops_before_training_naming_file_and_key(ds, tmp_path):
    npz = _without(ds["grounding"], tmp_path / "grounding.npz", {"1001_cat"})
    with pytest.raises(InputError) as err:
        _inputs(ds, "--is-vg", "--grounding-images", str(npz))
    msg = str(err.value)
    assert msg.startswith(
        f"--is-vg (--grounding-images): {npz} has no grounding image '1001_cat' "
        f"(needed by {ds['train']}:2)"
    )
    assert (
        "1 of 4 captions with a grounded label (25.00%)" in msg
        and "--max-missing-fraction 0.25" in msg
    )
    with pytest.raises(InputError, match="above --max-missing-fraction 0.2"):
        _inputs(ds, "--is-vg", "--grounding-images", str(npz), "--max-missing-fraction", "0.2")


def test_allowed_missing_grounding_image_takes_the_masked_square(ds, tmp_path):
    npz = _without(ds["grounding"], tmp_path / "grounding.npz", {"1001_cat"})
    inputs = _inputs(
        ds, "--is-vg", "--grounding-images", str(npz), "--max-missing-fraction", "0.25"
    )
    warnings = [m for level, m in inputs.report if level == logging.WARNING]
    assert (
        len(warnings) == 1
        and "'1001_cat'" in warnings[0]
        and "masked-square substitute" in warnings[0]
    )
    dset = inputs.dataset(64)
    dset.augment = "none"
    ex = dset[1]
    diff = (ex["grounding_masked"] != ex["image"]).any(0)
    assert 0 < diff.sum() <= 32 * 32
    ground = np.load(npz)
    assert torch.equal(dset[0]["grounding_masked"], array_to_tensor(ground["1000_dog"], 64))


def test_train_image_without_objects_line_is_a_miss(ds, tmp_path):
    objects = tmp_path / "objects.jsonl"
    lines = ds["objects"].read_text().splitlines()
    objects.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # no line for image 1002
    with pytest.raises(InputError) as err:
        _inputs(ds, "--is-da-loss", "--train-objects", str(objects))
    msg = str(err.value)
    assert msg.startswith(
        f"--is-da-loss (--train-objects): {objects} has no objects line '1002' "
        f"(needed by {ds['train']}:3)"
    )
    assert "1 of 4 train images" in msg
    inputs = _inputs(
        ds, "--is-da-loss", "--train-objects", str(objects), "--max-missing-fraction", "0.3"
    )
    assert "2 of 4 captions' images list no object" in "\n".join(m for _, m in inputs.report)


def test_objects_are_read_from_every_file_in_order(tmp_path):
    a, b = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    a.write_text(
        '{"image_id": "1", "image_objects": ["dog"]}\n{"image_id": "2", "image_objects": ["cat"]}\n'
    )
    b.write_text(
        '{"image_id": "2", "image_objects": ["hat"]}\n{"image_id": "3", "image_objects": []}\n'
    )
    assert D.load_objects([a, b]) == {"1": ["dog"], "2": ["hat"], "3": []}


@pytest.mark.parametrize(
    "archive,flag,key",
    [("vg_images", "--vg-images", "2010"), ("vg_mask_images", "--vg-mask-images", "ball_2011")],
)
def test_missing_visual_genome_image_is_a_miss(ds, tmp_path, archive, flag, key):
    npz = _without(ds[archive], tmp_path / "vg.npz", {key})
    with pytest.raises(InputError) as err:
        _inputs(ds, "--is-da-mask", flag, str(npz))
    msg = str(err.value)
    assert msg.startswith(f"--is-da-mask ({flag}): {npz} has no Visual Genome ")
    assert f"'{key}' (needed by {ds['vg_vocab']}:2)" in msg and "1 of 6 usable VG entries" in msg
    inputs = _inputs(ds, "--is-da-mask", flag, str(npz), "--max-missing-fraction", "0.2")
    assert inputs.vg_vocab["ball"] == [
        "2011" if key.endswith("2010") else "2010"
    ]  # the other entry only


def test_missing_data_leaves_no_run_directory(ds, tmp_path):
    npz = _without(ds["grounding"], tmp_path / "grounding.npz", {"1003_bird"})
    argv = [
        "--train-data",
        str(ds["train"]),
        "--model",
        "tiny",
        "--is-vg",
        "--grounding-images",
        str(npz),
        "--logs",
        str(tmp_path / "logs"),
        "--name",
        "run",
        "--device",
        "cpu",
    ]
    with pytest.raises(InputError, match="'1003_bird'"):
        run(parse_args(argv), DistEnv())
    assert not (tmp_path / "logs").exists()


def test_max_missing_fraction_flag_is_checked():
    with pytest.raises(InputError, match="--max-missing-fraction must be between 0 and 1"):
        parse_args(["--train-data", "x.jsonl", "--max-missing-fraction", "1.5"])
    proc = subprocess.run(
        [PY, str(ROOT / "training" / "main_all.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--max-missing-fraction" in proc.stdout


def test_dataset_defaults_to_the_one_the_training_file_is_named_for(tmp_path):
    coco = parse_args(
        ["--train-data", str(tmp_path / "annotation" / "coco_train_pred.jsonl"), "--model", "tiny"]
    )
    assert coco.dataset == "coco"
    assert D.resolve_paths(coco).train_images == tmp_path / "annotation" / "coco_train_images.npz"
    assert D.resolve_paths(coco).grounding_images == tmp_path / "coco_visual_grounding.224.npz"
    other = parse_args(["--train-data", str(tmp_path / "captions.jsonl"), "--model", "tiny"])
    assert other.dataset == "flickr30k"
    forced = parse_args(
        [
            "--train-data",
            str(tmp_path / "coco_train_pred.jsonl"),
            "--dataset",
            "flickr30k",
            "--model",
            "tiny",
        ]
    )
    assert forced.dataset == "flickr30k"
