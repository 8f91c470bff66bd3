"""scripts/prepare_data.py end to end on tiny raw datasets in the official formats (tests/_raw_data.py):
the layout's files and their agreement, odd input, atomicity, re-runs, determinism, COCO with detector
boxes, and the prepared layout feeding a training run and the evaluation chain."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agree.entities import grounding_label
from agree.images import BoxMasks, ImageArchive
from agree.layout import Layout, grounding_key
from agree.masks import MaskBoxes
from dataprep.geometry import Geometry, pixel_span
from dataprep.images import Storage
from dataprep.pipeline import PrepareConfig, prepare
from tests._raw_data import COLOURS, make_coco, make_flickr30k, make_vg, write_boxes

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPT = ROOT / "scripts" / "prepare_data.py"
R = 64  # the tiny model's input resolution


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(SCRIPT), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def _grounding(lay: Layout) -> BoxMasks:
    """The grounding masks of a layout written with the default --masks boxes, drawn over its train images."""
    return BoxMasks(MaskBoxes(lay.grounding_boxes), ImageArchive(lay.train_npz))


def _vg_masks(lay: Layout) -> BoxMasks:
    """The Visual Genome masks of a layout written with --masks boxes, drawn over its VG images."""
    return BoxMasks(MaskBoxes(lay.vg_mask_boxes), ImageArchive(lay.vg_images))


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _flickr_raw(base: Path, odd: bool = True, entities: bool = True) -> dict:
    info = make_flickr30k(base / "raw", n_train=8, odd=odd, entities=entities)
    heldout = [int(im.stem) for im in info["images"] if im.split != "train"]
    info["vg"] = make_vg(base / "vg", {"flickr_id": heldout[:2]})
    info["heldout_vg"] = {
        e["image_id"] for e in info["vg"]["image_data"] if e["flickr_id"] is not None
    }
    return info


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    base = tmp_path_factory.mktemp("flickr")
    info = _flickr_raw(base)
    lines: list[str] = []
    report = prepare(
        PrepareConfig(
            "flickr30k",
            base / "raw",
            base / "vg",
            base / "out",
            resolution=R,
            storage="uint8",
            max_missing_fraction=0.3,
            workers=0,
            progress=False,
            log=lines.append,
        )
    )
    return base, info, report, "\n".join(lines)


def test_every_layout_file_is_written(flickr):
    base, _, report, log = flickr
    lay = Layout.under(base / "out", "flickr30k")
    assert report.layout == lay and not report.skipped
    for path in (
        lay.train_jsonl,
        lay.train_npz,
        lay.val_json,
        lay.val_npz,
        *lay.test_files(),
        lay.grounding_boxes,
        lay.vg_images,
        lay.vg_mask_boxes,
        lay.vg_vocab,
        *(lay.objects(s) for s in ("train", "val", "test")),
    ):
        assert path.is_file() and path.stat().st_size > 0, path
    # without --masks: mask boxes, and no archive of masked copies
    assert not lay.grounding.exists() and not lay.vg_masked.exists()
    assert not list((base / "out").glob(".prepare_data.*"))  # the staging folder is gone
    assert f"wrote {lay.data_dir}" in log


def test_odd_input_is_skipped_by_name_or_absorbed(flickr):
    base, info, report, log = flickr
    odd = info["odd"]
    raw = base / "raw"
    # skipped, each named: the missing image, the truncated one, the duplicate entry, the box outside its image
    assert f"{raw}/flickr30k-images/{odd['missing']}.jpg: image file not found" in log
    assert f"{raw}/flickr30k-images/{odd['truncated']}.jpg: cannot decode the image" in log
    assert "duplicate file of images[0]" in log and odd["duplicate"] in log
    assert (
        f"Annotations/{odd['box_outside']}.xml: box" in log
        and "lies outside the 80x60 image" in log
    )
    assert report.odd["skipped"] == {"boxes": 1, "images": 3}
    # absorbed and reported: EXIF orientation, PNG content in a .jpg, grayscale and CMYK, captions without entities
    noted = report.odd["noted"]
    assert noted["EXIF-rotated images (shown upright)"] == 1
    assert noted["images whose content is not what the file name says (read by content)"] == 1
    assert noted["images converted to RGB"] == 2
    assert (
        noted["captions without any textual entity"] == 11
    )  # "Somebody looks at each other." x 11 images
    lay = report.layout
    kept = {r["image"] for r in _jsonl(lay.train_jsonl)}
    assert (
        f"flickr30k-images/{odd['missing']}.jpg" not in kept
        and f"flickr30k-images/{odd['truncated']}.jpg" not in kept
    )
    for case in ("grayscale", "cmyk", "png_as_jpg", "exif", "box_outside"):
        assert f"flickr30k-images/{odd[case]}.jpg" in kept


def test_train_records_segs_preds_and_grounding_images_agree(flickr):
    base, info, report, _ = flickr
    lay = report.layout
    records = _jsonl(lay.train_jsonl)
    images = np.load(lay.train_npz)
    grounding = _grounding(lay)
    by_stem = {im.stem: im for im in info["images"]}
    used = set()
    for r in records:
        stem = Path(r["image"]).stem
        assert str(r["image_id"]) in images.files
        assert all(s in r["caption"] for s in r["segs"])  # exact substrings (masking)
        label = grounding_label(r["preds"])
        if label is not None:
            assert grounding_key(stem, label) in grounding
            assert grounding.boxes.image_id(grounding_key(stem, label)) == str(r["image_id"])
            used.add(grounding_key(stem, label))
        im = by_stem[stem]
        assert r["image_id"] == im.source_id  # Karpathy's imgid
    assert used == set(grounding.boxes.keys())  # no unused mask
    # one image by hand: gold phrases of the tokenised Entities sentences on Karpathy's raw captions
    stem = info["odd"]["grayscale"]
    im = by_stem[stem]
    a, b = im.objects[0].word, im.objects[1].word
    mine = [r for r in records if Path(r["image"]).stem == stem]
    assert [r["segs"] for r in mine] == [
        [f"A {a}", f"a {b}"],
        [f"The {a}'s {b}", "a tree"],
        [f"A young, smiling {a}"],
        [],
        [f"Two {b}s", f"a {a}"],
    ]
    # "a tree" has no box (nobndbox); "each other" is not visual; labels are head words, gold score 1
    assert [r["preds"] for r in mine] == [
        [{a: 1.0}, {b: 1.0}],
        [{b: 1.0}],
        [{a: 1.0}],
        [],
        [{f"{b}s": 1.0}, {a: 1.0}],
    ]


def test_masked_grounding_image_hides_the_gold_box_after_resize_and_crop(flickr):
    base, info, report, _ = flickr
    lay = report.layout
    stem = info["odd"]["png_as_jpg"]
    im = next(i for i in info["images"] if i.stem == stem)
    rec = next(r for r in _jsonl(lay.train_jsonl) if Path(r["image"]).stem == stem)
    image = np.load(lay.train_npz)[str(rec["image_id"])]
    person = im.objects[0]
    masked = _grounding(lay)[grounding_key(stem, person.word)]
    x0, y0, x1, y1 = pixel_span(Geometry(*im.size, R).crop_box(person.box))
    inside = np.zeros((R, R), bool)
    inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
    assert (masked[inside] == Storage.from_clip("uint8").fill).all()
    assert (masked[~inside] == image[~inside]).all()
    # and the stored image shows the person's colour there (PNG content read despite the .jpg name)
    centre = image[(y0 + y1) // 2, (x0 + x1) // 2].astype(int)
    assert np.abs(centre - COLOURS[person.word]).max() <= 12


def test_exif_rotated_and_grayscale_images_are_stored_upright_rgb(flickr):
    base, info, report, _ = flickr
    lay = report.layout
    records = {Path(r["image"]).stem: r for r in _jsonl(lay.train_jsonl)}
    images = np.load(lay.train_npz)
    im = next(i for i in info["images"] if i.stem == info["odd"]["exif"])
    arr = images[str(records[im.stem]["image_id"])]
    for o in im.objects:  # boxes are given on the upright image
        x0, y0, x1, y1 = Geometry(*im.size, R).crop_box(o.box)
        centre = arr[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int)
        assert np.abs(centre - COLOURS[o.word]).max() <= 12, o.word
    gray = images[str(records[info["odd"]["grayscale"]]["image_id"])]
    assert (
        gray.shape == (R, R, 3)
        and (gray[..., 0] == gray[..., 1]).all()
        and (gray[..., 1] == gray[..., 2]).all()
    )


def test_val_and_test_files(flickr):
    base, info, report, _ = flickr
    lay = report.layout
    val = json.loads(lay.val_json.read_text())
    assert [v["image"] for v in val] == [
        f"flickr30k-images/{im.stem}.jpg" for im in info["images"] if im.split == "val"
    ]
    assert all(len(v["caption"]) == 5 for v in val)
    assert np.load(lay.val_npz).files == [str(i) for i in range(len(val))]
    tests = [im for im in info["images"] if im.split == "test"]
    gt_images = _jsonl(lay.test_images)
    assert [g["image_id"] for g in gt_images] == [
        int(im.stem) for im in tests
    ]  # the file stem, as a number
    assert [g["item_ids"] for g in gt_images] == [
        list(range(5 * k, 5 * k + 5)) for k in range(len(tests))
    ]
    texts, segs = _jsonl(lay.test_texts), _jsonl(lay.test_segs)
    assert (
        [t["query_id"] for t in texts]
        == [s["query_id"] for s in segs]
        == list(range(5 * len(tests)))
    )
    assert [t["query_text"] for t in texts] == [c for im in tests for c in im.captions]
    for t, s in zip(texts, segs):
        assert t["item_ids"] == [gt_images[t["query_id"] // 5]["image_id"]]
        assert s["query_text"] == t["query_text"] and all(x in t["query_text"] for x in s["items"])
    assert np.load(lay.test_npz).files == [im.stem for im in tests]


def test_objects_and_visual_genome(flickr):
    base, info, report, log = flickr
    lay = report.layout
    vocab = {r["vocab"]: r["objects"] for r in _jsonl(lay.vg_vocab)}
    vg_images, vg_masked = np.load(lay.vg_images), _vg_masks(lay)
    splits = {"train": [], "val": [], "test": []}
    for split in splits:
        for r in _jsonl(lay.objects(split)):
            assert isinstance(r["image_id"], str)
            assert set(r["image_objects"]) <= set(vocab)  # every object has VG images
            splits[split].append(r["image_id"])
    assert splits["val"] == [im.stem for im in info["images"] if im.split == "val"]
    for word, entries in vocab.items():
        assert entries and all(e["object"] for e in entries)
        for e in entries:
            assert str(e["image_id"]) in vg_images.files and f"{word}_{e['image_id']}" in vg_masked
            assert e["image_id"] not in info["heldout_vg"]
    assert not {str(g) for g in info["heldout_vg"]} & set(vg_images.files)
    assert "excluded 2 of 10 images that are flickr30k val/test images (by flickr_id)" in log
    # a masked VG image is its image with one rectangle filled with the mean colour
    for word, entries in vocab.items():
        g = entries[0]["image_id"]
        masked, image = vg_masked[f"{word}_{g}"], vg_images[str(g)]
        ys, xs = np.nonzero((masked != image).any(-1))
        rect = np.zeros(masked.shape[:2], bool)
        rect[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
        assert (masked[rect] == Storage.from_clip("uint8").fill).all() and (
            masked[~rect] == image[~rect]
        ).all()
        assert 0.02 * R * R <= rect.sum() <= 0.8 * R * R + 2 * R


def test_failure_leaves_nothing_and_names_the_file(tmp_path):
    _flickr_raw(tmp_path)
    out = tmp_path / "out"
    proc = _run(
        "--dataset",
        "flickr30k",
        "--raw",
        str(tmp_path / "raw"),
        "--vg-raw",
        str(tmp_path / "vg"),
        "--out",
        str(out),
        "--resolution",
        str(R),
        "--workers",
        "0",
    )
    assert proc.returncode == 2
    assert "error: " in proc.stderr and "duplicate file of images[0]" in proc.stderr
    assert "--max-missing-fraction" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # no partial layout, no staging folder
    # a failure in the middle (a bad image, once the duplicate is allowed) leaves an existing --out clean too
    out.mkdir()
    proc = _run(
        "--raw",
        str(tmp_path / "raw"),
        "--vg-raw",
        str(tmp_path / "vg"),
        "--out",
        str(out),
        "--resolution",
        str(R),
        "--workers",
        "0",
        "--max-missing-fraction",
        "0.08",
    )
    assert proc.returncode == 2 and "error: " in proc.stderr
    assert f"{tmp_path}/raw/flickr30k-images/" in proc.stderr.split("\n")[0]  # the image at fault
    assert list(out.iterdir()) == []


def test_rerun_is_a_noop_overwrite_rebuilds_and_workers_do_not_change_bytes(tmp_path):
    _flickr_raw(tmp_path, odd=False)
    args = [
        "--raw",
        str(tmp_path / "raw"),
        "--vg-raw",
        str(tmp_path / "vg"),
        "--resolution",
        str(R),
    ]
    first = _run(*args, "--out", str(tmp_path / "a"), "--workers", "0")
    assert first.returncode == 0, first.stderr
    files = _files(tmp_path / "a")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    again = _run(*args, "--out", str(tmp_path / "a"), "--workers", "0")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == mtimes
    other = _run(*args[:-1], "32", "--out", str(tmp_path / "a"), "--workers", "0")
    assert other.returncode == 2 and "other settings (resolution: 64 there, 32 now)" in other.stderr
    rebuilt = _run(*args, "--out", str(tmp_path / "a"), "--workers", "0", "--overwrite")
    assert rebuilt.returncode == 0 and _files(tmp_path / "a") == files
    parallel = _run(*args, "--out", str(tmp_path / "b"), "--workers", "2")
    assert parallel.returncode == 0, parallel.stderr
    assert _files(tmp_path / "b") == files  # same inputs -> same bytes, whatever the worker count
    # a folder that prepare_data.py did not write is never replaced without --overwrite
    (tmp_path / "c" / "VG").mkdir(parents=True)
    foreign = _run(*args, "--out", str(tmp_path / "c"), "--workers", "0")
    assert foreign.returncode == 2 and "was not written by prepare_data.py" in foreign.stderr


def test_without_grounding_source_preds_are_empty_and_no_grounding_file(tmp_path):
    _flickr_raw(tmp_path, odd=False, entities=False)
    lines: list[str] = []
    report = prepare(
        PrepareConfig(
            "flickr30k",
            tmp_path / "raw",
            tmp_path / "vg",
            tmp_path / "out",
            resolution=R,
            workers=0,
            progress=False,
            log=lines.append,
        )
    )
    lay = report.layout
    assert not lay.grounding.exists() and not lay.grounding_boxes.exists()
    assert "no grounding source" in "\n".join(lines) and "--is-vg then needs one" in "\n".join(
        lines
    )
    records = _jsonl(lay.train_jsonl)
    assert all(r["preds"] == [] for r in records)
    # segs from the TextBlob chunker: noun phrases, substrings of the caption
    first = records[0]
    assert first["segs"] and all(s in first["caption"] for s in first["segs"])
    arr = np.load(lay.train_npz)[str(first["image_id"])]
    assert arr.dtype == np.uint8 and arr.shape == (R, R, 3)  # the default storage


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    base = tmp_path_factory.mktemp("coco")
    info = make_coco(base / "raw")
    heldout = [im.source_id for im in info["images"] if im.split != "train"]
    info["vg"] = make_vg(base / "vg", {"coco_id": heldout[:3]})
    train = [im for im in info["images"] if im.split == "train"]
    info["boxes"] = write_boxes(base / "boxes.jsonl", info["images"], outside=train[0].stem)
    lines: list[str] = []
    report = prepare(
        PrepareConfig(
            "coco",
            base / "raw",
            base / "vg",
            base / "out",
            boxes=base / "boxes.jsonl",
            resolution=R,
            max_missing_fraction=0.05,
            workers=0,
            progress=False,
            log=lines.append,
        )
    )
    return base, info, report, "\n".join(lines)


def test_coco_ids_splits_and_captions(coco):
    base, info, report, log = coco
    lay = report.layout
    assert lay.train_jsonl.name == "coco_train_pred.jsonl" and lay.data_dir.name == "coco_images"
    records = _jsonl(lay.train_jsonl)
    train = [im for im in info["images"] if im.split == "train"]  # train and restval
    assert sorted({r["image_id"] for r in records}) == sorted(
        im.source_id for im in train
    )  # cocoid ints
    assert len(records) == sum(len(im.captions) for im in train)  # all captions
    assert {r["image"].split("/")[0] for r in records} == {
        "train2014",
        "val2014",
    }  # restval is in val2014
    assert all(r["caption"] == r["caption"].strip() for r in records)
    tests = [im for im in info["images"] if im.split == "test"]
    assert np.load(lay.test_npz).files == [str(im.source_id) for im in tests]
    assert [g["image_id"] for g in _jsonl(lay.test_images)] == [im.source_id for im in tests]
    assert len(_jsonl(lay.test_texts)) == 5 * len(tests)  # 5 kept of 5-7
    val = json.loads(lay.val_json.read_text())
    assert all(len(v["caption"]) == 5 for v in val)
    assert [r["image_id"] for r in _jsonl(lay.objects("test"))] == [
        im.stem for im in tests
    ]  # stems
    assert "excluded 3 of 10 images that are coco val/test images (by coco_id)" in log


def test_coco_grounding_from_detector_boxes(coco):
    base, info, report, log = coco
    lay = report.layout
    grounding = _grounding(lay)
    by_stem = {im.stem: im for im in info["images"]}
    for r in _jsonl(lay.train_jsonl):
        stem = Path(r["image"]).stem
        # detections whose label is a word of the caption, score >= 0.5 ("tree" at 0.2 never), highest score first
        expected = [
            {o.word: 0.9 - 0.1 * k}
            for k, o in enumerate(by_stem[stem].objects)
            if re.search(rf"\b{o.word}\b", r["caption"], re.I)
        ]
        assert r["preds"] == expected, r
        labels = [next(iter(p)) for p in r["preds"]]
        assert "tree" not in labels
        label = grounding_label(r["preds"])
        if label is not None:
            assert grounding_key(stem, label) in grounding
    assert "not_in_the_split.jpg" in log  # reported, ignored
    assert report.odd["skipped"] == {"boxes": 1}  # the box outside its image


def test_flickr30k_and_coco_share_one_vg_folder_free_of_both_test_sets(tmp_path):
    flickr = make_flickr30k(tmp_path / "f", n_train=4, n_val=2, n_test=2)
    coco = make_coco(tmp_path / "c", n_train=3, n_restval=1, n_val=2, n_test=2)
    heldout = {
        "flickr_id": [int(im.stem) for im in flickr["images"] if im.split != "train"],
        "coco_id": [im.source_id for im in coco["images"] if im.split != "train"],
    }
    vg_raw = tmp_path / "vg"
    vg_info = make_vg(vg_raw, heldout, n=12)
    excluded = {e["image_id"] for e in vg_info["image_data"] if e["flickr_id"] or e["coco_id"]}
    assert len(excluded) == 8

    def run(dataset, out):
        return prepare(
            PrepareConfig(
                dataset,
                tmp_path / dataset[0],
                vg_raw,
                out,
                resolution=32,
                storage="uint8",
                workers=0,
                progress=False,
                log=lambda _: None,
            )
        )

    a = run("flickr30k", tmp_path / "a").layout
    flickr_files = _files(a.data_dir)
    run("coco", tmp_path / "a")
    assert _files(a.data_dir) == flickr_files  # the other dataset's folder is untouched
    manifest = json.loads((a.vg_dir / "prepare_data.json").read_text())
    assert list(manifest["datasets"]) == ["coco", "flickr30k"]
    assert not {str(g) for g in excluded} & set(np.load(a.vg_images).files)
    vocab = {r["vocab"] for r in _jsonl(a.vg_vocab)}
    for dataset in ("flickr30k", "coco"):
        lay = Layout.under(tmp_path / "a", dataset)
        for split in ("train", "val", "test"):
            assert all(set(r["image_objects"]) <= vocab for r in _jsonl(lay.objects(split)))
    assert run("flickr30k", tmp_path / "a").skipped and run("coco", tmp_path / "a").skipped
    # the other order gives the same bytes
    run("coco", tmp_path / "b")
    run("flickr30k", tmp_path / "b")
    assert _files(tmp_path / "b") == _files(tmp_path / "a")


def test_help_lists_the_contract_flags():
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in (
        "--dataset",
        "--raw",
        "--vg-raw",
        "--out",
        "--boxes",
        "--resolution",
        "--max-missing-fraction",
        "--overwrite",
        "flickr30k",
        "coco",
    ):
        assert flag in proc.stdout


def test_prepared_layout_trains_and_runs_the_evaluation_chain(flickr, tmp_path):
    """One fine-tuning run with all five AGREE flags (README recipe, tiny model), then the fine-tuned evaluation
    recipe (extraction, top-k, TBR, recall) on the prepared test split."""
    base, _, report, _ = flickr
    lay = report.layout
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = tmp_path / "logs"
    train = subprocess.run(
        [
            PY,
            str(ROOT / "training/main_all.py"),
            f"--train-data={lay.train_jsonl}",
            f"--val-data={lay.val_json}",
            "--img-key",
            "image",
            "--caption-key",
            "caption",
            "--dataset-type",
            "json",
            "--is-mask",
            "--is-prompt",
            "--is-da-loss",
            "--is-da-mask",
            "--is-vg",
            "--batch-size",
            "10",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--warmup",
            "1",
            "--lr",
            "1e-4",
            "--wd",
            "0.1",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--logs",
            str(logs),
            "--name",
            "run",
            "--log-every-n-steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    log = (logs / "run" / "out.log").read_text()
    for term in ("global", "prompt", "text_mask", "vg_contrastive", "vg_mask", "grounding_mask"):
        assert f"{term} " in log
    ckpt = logs / "run" / "checkpoints" / "epoch_1.pt"
    preds = tmp_path / "preds"
    steps = [
        [
            "eval/extract_features.py",
            "--extract-image-feats",
            "--extract-text-feats",
            f"--image-data={lay.test_npz}",
            f"--text-data={lay.test_texts}",
            "--img-batch-size=4",
            "--text-batch-size=4",
            f"--resume={ckpt}",
            f"--image-feat-output-path={preds}/img.jsonl",
            f"--text-feat-output-path={preds}/txt.jsonl",
            "--model",
            "tiny",
            "--device",
            "cpu",
        ],
        [
            "eval/make_topk_predictions.py",
            f"--image-feats={preds}/img.jsonl",
            f"--text-feats={preds}/txt.jsonl",
            "--top-k=3",
            "--eval-batch-size=4",
            f"--output-images={preds}/pi.jsonl",
            f"--output-texts={preds}/pt.jsonl",
        ],
        [
            "eval/eval_back_retrieval.py",
            str(lay.test_images),
            f"{preds}/pi.jsonl",
            str(lay.test_texts),
            f"{preds}/pt.jsonl",
            f"{preds}/pi_rerank.jsonl",
            f"{preds}/pt_rerank.jsonl",
        ],
        [
            "eval/evaluation.py",
            str(lay.test_texts),
            f"{preds}/pt_rerank.jsonl",
            f"{preds}/t.json",
            "query_id",
        ],
        [
            "eval/evaluation.py",
            str(lay.test_images),
            f"{preds}/pi_rerank.jsonl",
            f"{preds}/i.json",
            "image_id",
        ],
    ]
    preds.mkdir()
    for step in steps:
        proc = subprocess.run(
            [PY, str(ROOT / step[0]), *step[1:]],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert proc.returncode == 0, (step[0], proc.stderr[-3000:])
    for name in ("t.json", "i.json"):
        result = json.loads((preds / name).read_text())
        assert (
            result["success"] is True
            and 0 <= result["scoreJson"]["r1"] <= result["scoreJson"]["r10"] <= 100
        )
