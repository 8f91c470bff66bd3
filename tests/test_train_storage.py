"""Masks at load time, and storage that never changes the recipe: the same raw downloads prepared four ways
(uint8 or float32 storage x mask boxes or masked copies) give bit-identical training batches, every slot,
with and without augmentation; `--masks images` writes the release's archives of masked copies."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from agree.images import BoxMasks, ImageArchive
from agree.io import InputError
from agree.layout import Layout
from agree.masks import MaskBoxes
from agree.pixels import normalise
from dataprep.pipeline import PrepareConfig, prepare
from tests._raw_data import make_flickr30k, make_vg
from training import data as D
from training import dataset as DS
from training.augment import AUGMENTATIONS
from training.params import parse_args
from training.slots import IMAGE_SLOTS, TEXT_SLOTS
from training.terms import AGREE_TERMS, enabled_terms, flags_of

R = 64
FORMS = [(s, m) for s in ("uint8", "float32") for m in ("boxes", "images")]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("storage")
    info = make_flickr30k(base / "raw", n_train=8, odd=False)
    make_vg(
        base / "vg", {"flickr_id": [int(im.stem) for im in info["images"] if im.split != "train"]}
    )
    out = {}
    for storage, masks in FORMS:
        report = prepare(
            PrepareConfig(
                "flickr30k",
                base / "raw",
                base / "vg",
                base / f"{storage}-{masks}",
                resolution=R,
                storage=storage,
                masks=masks,
                workers=0,
                progress=False,
                log=lambda line: None,
            )
        )
        out[(storage, masks)] = report.layout
    return out


def _archive(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _drawn(boxes: Path, images: Path) -> dict:
    m = BoxMasks(MaskBoxes(boxes), ImageArchive(images))
    return {k: m[k] for k in m.boxes.keys()}


def test_masks_images_writes_the_release_archives_and_boxes_only_the_boxes(layouts):
    for (storage, masks), lay in layouts.items():
        copies, boxes = (lay.grounding, lay.vg_masked), (lay.grounding_boxes, lay.vg_mask_boxes)
        assert all(p.is_file() == (masks == "images") for p in copies), (storage, masks)
        assert all(p.is_file() == (masks == "boxes") for p in boxes), (storage, masks)
    for storage in ("uint8", "float32"):
        copies, boxed = layouts[(storage, "images")], layouts[(storage, "boxes")]
        for archive, box_file, images in (
            ("grounding", "grounding_boxes", "train_npz"),
            ("vg_masked", "vg_mask_boxes", "vg_images"),
        ):
            written = _archive(getattr(copies, archive))
            drawn = _drawn(getattr(boxed, box_file), getattr(boxed, images))
            assert written and list(written) == list(drawn)  # the same keys, in the same order
            for k, a in written.items():
                assert a.dtype == drawn[k].dtype and np.array_equal(a, drawn[k]), (storage, k)
    # a float32 masked copy is the normalised uint8 one: the fill normalises like every other pixel
    u8, f32 = (
        _archive(layouts[("uint8", "images")].grounding),
        _archive(layouts[("float32", "images")].grounding),
    )
    for k, a in u8.items():
        assert np.array_equal(f32[k], normalise(a))


def _dataset(lay: Layout, augment: str, *extra: str):
    args = parse_args(
        [
            "--train-data",
            str(lay.train_jsonl),
            "--model",
            "tiny",
            "--augment",
            augment,
            *flags_of(AGREE_TERMS),
            *extra,
        ]
    )
    return DS.build_train_dataset(args, D.resolve_paths(args), enabled_terms(args), R)


def _batches(dset, epochs: int = 2) -> list[dict]:
    out = []
    for epoch in range(epochs):
        dset.set_epoch(epoch)
        out += list(DataLoader(dset, batch_size=4, shuffle=False, num_workers=0))
    return out


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_batches_are_bit_identical_whatever_the_storage_and_the_mask_form(layouts, augment):
    sets = {form: _dataset(lay, augment) for form, lay in layouts.items()}
    for (storage, masks), dset in sets.items():  # each layout is read in its own form
        assert dset.grounding.kind == masks and dset.vg_masked.kind == masks
        assert (dset.images[dset.records[0].image_key].dtype == np.uint8) == (storage == "uint8")
    reference = _batches(sets[FORMS[0]])
    assert set(reference[0]) == set(IMAGE_SLOTS + TEXT_SLOTS)  # every slot
    for form in FORMS[1:]:
        for ref, other in zip(reference, _batches(sets[form]), strict=True):
            for slot, value in ref.items():
                assert torch.equal(value, other[slot]), (form, slot)
    # the data exercises what the identity is about: real masks and both fallbacks
    records = sets[FORMS[0]].records
    assert any(r.grounding_key is None for r in records) and any(r.grounding_key for r in records)
    b = reference[0]
    assert any(not torch.equal(b["grounding_masked"][i], b["image"][i]) for i in range(4))


def test_augmentation_changes_the_images_and_only_with_its_flag(layouts):
    lay = layouts[("uint8", "boxes")]
    plain, crop = (
        _batches(_dataset(lay, "none"), 1),
        _batches(_dataset(lay, "random-resized-crop"), 1),
    )
    for a, b in zip(plain, crop):
        assert torch.equal(a["text"], b["text"])
        assert not torch.equal(a["image"], b["image"])
    # without augmentation an image is its stored pixels, normalised (the release's recipe)
    dset = _dataset(lay, "none")
    r = dset.records[0]
    expected = torch.from_numpy(normalise(dset.images[r.image_key]))
    assert torch.equal(dset[0]["image"], expected)


def test_flags_choose_the_mask_form_and_the_layout_default_is_whichever_is_there(layouts, tmp_path):
    boxed, copies = layouts[("uint8", "boxes")], layouts[("uint8", "images")]
    # explicit flags point at the other layout's files
    dset = _dataset(boxed, "none", "--grounding-images", str(copies.grounding))
    assert dset.grounding.kind == "images" and dset.vg_masked.kind == "boxes"
    dset = _dataset(copies, "none", "--vg-mask-boxes", str(boxed.vg_mask_boxes))
    assert dset.grounding.kind == "images" and dset.vg_masked.kind == "boxes"
    with pytest.raises(InputError, match="--grounding-boxes and --grounding-images"):
        _dataset(
            boxed,
            "none",
            "--grounding-boxes",
            str(boxed.grounding_boxes),
            "--grounding-images",
            str(copies.grounding),
        )
    # neither form in the layout: the error names both flags and both paths
    args = parse_args(
        [
            "--train-data",
            str(boxed.train_jsonl),
            "--model",
            "tiny",
            "--is-vg",
            "--data-root",
            str(tmp_path),
            "--train-images",
            str(boxed.train_npz),
        ]
    )
    paths = D.resolve_paths(args)
    with pytest.raises(InputError) as err:
        D.check_files(args, enabled_terms(args), paths)
    msg = str(err.value)
    assert msg.startswith(
        "--is-vg: visual grounding masks (--grounding-boxes, or --grounding-images "
    )
    assert str(paths.grounding_boxes) in msg and str(paths.grounding_images) in msg


def test_missing_mask_boxes_count_against_the_missing_fraction(layouts, tmp_path):
    lay = layouts[("uint8", "boxes")]
    lines = lay.grounding_boxes.read_text().splitlines()
    dropped = tmp_path / "grounding.boxes.jsonl"
    dropped.write_text("\n".join(lines[1:]) + "\n")
    first = json.loads(lines[0])
    with pytest.raises(InputError) as err:
        _dataset(lay, "none", "--grounding-boxes", str(dropped))
    msg = str(err.value)
    assert msg.startswith(
        f"--is-vg (--grounding-boxes): {dropped} has no grounding mask {first['key']!r}"
    )
    assert "--max-missing-fraction" in msg
    dset = _dataset(lay, "none", "--grounding-boxes", str(dropped), "--max-missing-fraction", "0.5")
    assert len(dset.grounding.boxes) == len(lines) - 1
    # a mask drawn on another image than its record's is an error naming both
    wrong = tmp_path / "wrong.boxes.jsonl"
    moved = json.dumps({**first, "image_id": "9" + first["image_id"]})
    wrong.write_text("\n".join([moved] + lines[1:]) + "\n")
    with pytest.raises(InputError, match=f"is drawn on image '9{first['image_id']}'"):
        _dataset(lay, "none", "--grounding-boxes", str(wrong))


def test_disk_formulas_match_the_bytes_prepare_data_writes(layouts, capsys):
    from dataprep.disk import check

    written = {}
    for (storage, masks), lay in layouts.items():
        rows = {r["folder"]: r for r in check(lay.data_dir, lay.vg_dir, storage, R)}
        for row in rows.values():
            # every archive and mask file is exactly what the formats predict from its keys and lines
            assert row["predicted"] == row["archives and masks"] > 0, (storage, masks, row)
        written[(storage, masks)] = rows
    for folder in ("dataset folder", "VG"):
        texts = {form: rows[folder]["text"] for form, rows in written.items()}
        assert max(texts.values()) - min(texts.values()) < 200, texts  # only the manifests differ
    release, default = written[("float32", "images")], written[("uint8", "boxes")]
    for folder in ("dataset folder", "VG"):
        assert default[folder]["archives and masks"] * 3.9 < release[folder]["archives and masks"]
    # the script prints the same check
    from tests._scripts import load_script

    script = load_script("scripts/disk_usage.py")
    root = layouts[("uint8", "boxes")].root
    assert script.main(["--check", str(root), "--resolution", str(R)]) == 0
    out = capsys.readouterr().out
    row = written[("uint8", "boxes")]["VG"]
    assert f"written {row['written']:>12,} bytes" in out and f"{row['predicted']:>12,}" in out
