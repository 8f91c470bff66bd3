"""scripts/ground_entities.py end to end with tiny randomly initialised detectors (tests/_detectors.py) on tiny
raw datasets (tests/_raw_data.py): the boxes JSONL's schema, its phrases (those prepare_data.py extracts),
its boxes (scores as Grounding DINO's token-span phrase grounding computes them, in the displayed
image's pixels), prepare_data.py --boxes reading it, a run killed with SIGKILL and run again giving
the uninterrupted run's bytes, and clear errors for a missing detector folder."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from agree.io import InputError  # noqa: E402
from agree.layout import Layout  # noqa: E402
from dataprep.datasets import get_dataset  # noqa: E402
from dataprep.detect_boxes import GroundConfig, PhraseTask, ground, load_item  # noqa: E402
from dataprep.detector import GroundingDino, check_folder, load_detector  # noqa: E402
from dataprep.grounding import mentions, normalise_label  # noqa: E402
from dataprep.item import TextSettings  # noqa: E402
from dataprep.karpathy import read_split_file  # noqa: E402
from dataprep.pipeline import PrepareConfig, prepare  # noqa: E402
from dataprep.skips import SkipLog  # noqa: E402
from tests._detectors import tiny_grounding_dino, tiny_owlv2  # noqa: E402
from tests._raw_data import make_coco, make_flickr30k, make_vg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SCRIPT = ROOT / "scripts" / "ground_entities.py"
THRESHOLD = "0.25"
BATCH = "2"
KEYS = {"image", "label", "box", "score"}
_MARK = re.compile(r"\[/EN#(\d+)((?:/[^\s/\[\]]+)*)\s+([^\[\]]*?)\s*\]")


def _cmd(raw: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        PY,
        str(SCRIPT),
        "--dataset",
        "flickr30k",
        "--raw",
        str(raw),
        "--detector",
        "grounding-dino",
        "--detector-path",
        str(model),
        "--out",
        str(out),
        "--batch-size",
        BATCH,
        "--box-threshold",
        THRESHOLD,
        *extra,
    ]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("ground")
    info = make_flickr30k(base / "raw", n_train=12, odd=True)
    make_vg(base / "vg", {})
    model = tiny_grounding_dino(base / "grounding-dino")
    proc = _run(_cmd(base / "raw", model, base / "boxes.jsonl"))
    assert proc.returncode == 0, proc.stderr
    return base, info, model, proc


def _gold_phrases(marked: list[str]) -> set[str]:
    """The visual phrases of the Entities markup, as they read in the raw captions (lower case)."""
    out = set()
    for line in marked:
        for m in _MARK.finditer(line):
            if m.group(1) != "0":
                out.add(normalise_label(m.group(3).replace(" 's", "'s").replace(" ,", ",")))
    return out


def test_every_line_is_a_box_prepare_data_reads(world):
    base, info, _, proc = world
    out = base / "boxes.jsonl"
    assert sorted(p.name for p in base.iterdir() if p.name.startswith("boxes")) == [
        "boxes.jsonl",
        "boxes.jsonl.progress",
    ]
    lines = _lines(out)
    assert lines
    train = {f"{im.stem}.jpg": im for im in info["images"] if im.split == "train"}
    for r in lines:
        assert set(r) == KEYS, r
        assert r["image"] in train
        im = train[r["image"]]
        w, h = im.size  # the displayed size (the EXIF-rotated image is stored the other way round)
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, r
        assert float(THRESHOLD) <= r["score"] <= 1.0
        assert r["label"] == normalise_label(r["label"])
        assert r["label"] in _gold_phrases(im.marked)  # a gold phrase of one of its captions
        assert any(mentions(c, r["label"]) for c in im.captions)
    unreadable = {info["odd"]["truncated"], info["odd"]["missing"]}
    assert not {f"{s}.jpg" for s in unreadable} & {r["image"] for r in lines}
    assert "2 unreadable images got none" in proc.stderr + proc.stdout


def test_prepare_data_accepts_the_boxes(world):
    base, _, _, _ = world
    lines: list[str] = []
    report = prepare(
        PrepareConfig(
            "flickr30k",
            base / "raw",
            base / "vg",
            base / "out",
            boxes=base / "boxes.jsonl",
            box_threshold=float(THRESHOLD),
            resolution=32,
            storage="uint8",
            max_missing_fraction=0.3,
            workers=0,
            progress=False,
            log=lines.append,
        )
    )
    assert report.odd["skipped"].get("boxes", 0) == 0
    records = _lines(Layout.under(base / "out", "flickr30k").train_jsonl)
    labels = {r["label"] for r in _lines(base / "boxes.jsonl")}
    preds = [label for r in records for p in r["preds"] for label in p]
    assert preds and set(preds) <= labels
    for r in records:  # every grounded label is a whole-word phrase of its caption
        assert all(mentions(r["caption"], label) for p in r["preds"] for label in p)
    # the phrases grounded are exactly the segs prepare_data.py wrote (the same extraction)
    spec = get_dataset("flickr30k")
    entries = [
        e
        for e in read_split_file(spec.split_path(base / "raw"), spec, SkipLog(1.0, print))
        if e.split == "train"
    ]
    segs: dict[str, set] = {}
    for r in records:
        segs.setdefault(Path(r["image"]).name, set()).update(map(normalise_label, r["segs"]))
    sentences = base / "raw" / "flickr30k_entities" / "Sentences"
    for e in entries:
        name = Path(e.file).name
        if name not in segs:
            continue  # unreadable: prepare_data skipped it
        item = load_item(
            PhraseTask(
                e, str(base / "raw" / e.file), str(sentences / f"{e.stem}.txt"), TextSettings()
            )
        )
        assert set(item.phrases) == segs[name] and len(item.phrases) == len(segs[name])


def test_images_are_read_as_displayed(world):
    base, info, _, _ = world
    spec = get_dataset("flickr30k")
    entries = read_split_file(spec.split_path(base / "raw"), spec, SkipLog(1.0, print))
    exif = next(e for e in entries if e.stem == info["odd"]["exif"])
    item = load_item(PhraseTask(exif, str(base / "raw" / exif.file), None, TextSettings()))
    im = next(i for i in info["images"] if i.stem == exif.stem)
    assert item.image.shape == (im.size[1], im.size[0], 3)  # upright: H x W as displayed
    # the person's box is filled with its colour in the displayed image
    x0, y0, x1, y1 = im.objects[0].box
    patch = item.image[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3).mean(0)
    assert (
        np.abs(patch - {"man": (200, 40, 40), "woman": (40, 200, 40)}[im.objects[0].word]).max()
        < 30
    )
    assert item.phrases == ["somebody"] or all(" " in p or p.isalpha() for p in item.phrases)


def test_a_killed_run_continues_to_the_uninterrupted_output(world, tmp_path):
    base, _, model, _ = world
    out = tmp_path / "boxes.jsonl"
    progress = tmp_path / "boxes.jsonl.progress"
    p = subprocess.Popen(
        _cmd(base / "raw", model, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if progress.is_file() and '"done"' in progress.read_text():
                break
            time.sleep(0.005)
        assert p.poll() is None, "the run ended before it could be killed"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert not out.exists() and (tmp_path / "boxes.jsonl.partial").is_file()
    assert '"finished"' not in progress.read_text()
    again = _run(_cmd(base / "raw", model, out))
    assert again.returncode == 0, again.stderr
    assert re.search(r"continuing after \d+ of 12 training images", again.stdout)
    expected = (base / "boxes.jsonl").read_bytes()
    assert out.read_bytes() == expected
    assert len(set(expected.splitlines())) == len(expected.splitlines())  # no line twice
    noop = _run(_cmd(base / "raw", model, out))
    assert noop.returncode == 0 and "already complete" in noop.stdout
    assert out.read_bytes() == expected
    other = _run(_cmd(base / "raw", model, out)[:-1] + ["0.5"])
    assert (
        other.returncode == 2
        and "other settings (box_threshold: 0.25 then, 0.5 now)" in other.stderr
    )


def test_out_of_memory_names_the_batch_size_and_the_rerun_continues(world, tmp_path, monkeypatch):
    import dataprep.detect_boxes as job

    base, _, model, _ = world
    real = job.load_detector
    calls = []

    def load_failing_on_the_third_batch(*args, **kw):
        det = real(*args, **kw)
        detect = det.detect

        def failing(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return detect(*a, **k)

        det.detect = failing
        return det

    cfg = dict(
        dataset="flickr30k",
        raw=base / "raw",
        detector="grounding-dino",
        detector_path=model,
        out=tmp_path / "boxes.jsonl",
        batch_size=int(BATCH),
        box_threshold=float(THRESHOLD),
        workers=0,
        progress=False,
        log=lambda _: None,
    )
    monkeypatch.setattr(job, "load_detector", load_failing_on_the_third_batch)
    with pytest.raises(InputError, match="--batch-size 2: out of memory on cpu; run again"):
        ground(GroundConfig(**cfg))
    monkeypatch.undo()
    assert '"done":4' in (tmp_path / "boxes.jsonl.progress").read_text()  # two batches of 2
    report = ground(GroundConfig(**cfg))
    assert report.resumed_at == 4 and report.images == 8
    assert (tmp_path / "boxes.jsonl").read_bytes() == (base / "boxes.jsonl").read_bytes()


def test_scores_are_the_mean_token_probability_of_each_phrase(world):
    """Recomputed here from the model's own processor: prompt "a man. the dog's shirt.", token positions
    found by id, the score of (box q, phrase) = mean over the phrase's tokens of sigmoid(logit)."""
    import torch
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    _, _, model_dir, _ = world
    image = np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    phrases = ["a man", "the dog's shirt"]
    det = load_detector("grounding-dino", model_dir)
    found = det.detect([image], [phrases], 0.0)[0]
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = GroundingDinoForObjectDetection.from_pretrained(model_dir, local_files_only=True).eval()
    enc = processor(images=[image], text="a man. the dog's shirt.", return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    ids = enc["input_ids"][0].tolist()
    dot = processor.tokenizer.convert_tokens_to_ids(".")
    first_dot = ids.index(dot)
    spans = [range(1, first_dot), range(first_dot + 1, ids.index(dot, first_dot + 1))]
    probs = out.logits[0].sigmoid()
    expected = []
    for q in range(probs.shape[0]):
        cx, cy, bw, bh = out.pred_boxes[0, q].tolist()
        box = (
            max(cx - bw / 2, 0) * 90,
            max(cy - bh / 2, 0) * 60,
            min(cx + bw / 2, 1) * 90,
            min(cy + bh / 2, 1) * 60,
        )
        if box[2] - box[0] < 0.01 or box[3] - box[1] < 0.01:
            continue
        for phrase, span in zip(phrases, spans):
            expected.append((phrase, box, probs[q, list(span)].mean().item()))
    assert len(found) == len(expected) == 2 * probs.shape[0]  # threshold 0: every box, every phrase
    for d in found:  # boxes rounded to 0.01 pixel, scores to 1e-4
        close = [
            score
            for phrase, box, score in expected
            if phrase == d.label and max(abs(a - b) for a, b in zip(box, d.box)) <= 0.0051
        ]
        assert close and min(abs(score - d.score) for score in close) <= 0.00005 + 1e-7, d


def test_phrases_that_do_not_fit_one_prompt_go_into_more_prompts(world):
    _, _, model_dir, _ = world
    det = GroundingDino(model_dir)
    phrases = [
        f"a {w} {v}"
        for w in ("man", "woman", "dog", "ball")
        for v in ("hat", "car", "tree", "shirt")
    ]
    prompts = det._prompts([phrases, ["a dog"]])
    assert len(prompts) > 2 and [p.image for p in prompts][-1] == 1
    assert [q for p in prompts if p.image == 0 for q in p.phrases] == phrases
    for p in prompts:
        assert len(det.tokenizer(p.text)["input_ids"]) <= det.max_tokens
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    found = det.detect([image, image], [phrases, ["a dog"]], 0.0)
    assert {d.label for d in found[0]} == set(phrases) and {d.label for d in found[1]} == {"a dog"}


def test_owlv2_grounds_coco_through_the_library(tmp_path):
    info = make_coco(tmp_path / "raw", n_train=3, n_restval=1, n_val=1, n_test=1)
    model = tiny_owlv2(tmp_path / "owlv2")
    logs: list[str] = []
    report = ground(
        GroundConfig(
            "coco",
            tmp_path / "raw",
            "owlv2",
            model,
            tmp_path / "boxes.jsonl",
            batch_size=3,
            box_threshold=0.0,
            workers=0,
            progress=False,
            log=logs.append,
        )
    )
    assert report.images == 4 and report.boxes > 0
    lines = _lines(tmp_path / "boxes.jsonl")
    train = {Path(f"{im.stem}.jpg").name: im for im in info["images"] if im.split == "train"}
    assert {r["image"] for r in lines} <= set(train)
    for r in lines:
        assert set(r) == KEYS
        w, h = train[r["image"]].size
        assert 0 <= r["box"][0] < r["box"][2] <= w and 0 <= r["box"][1] < r["box"][3] <= h
        assert any(mentions(c, r["label"]) for c in train[r["image"]].captions)
    make_vg(tmp_path / "vg", {})
    prep = prepare(
        PrepareConfig(
            "coco",
            tmp_path / "raw",
            tmp_path / "vg",
            tmp_path / "out",
            boxes=tmp_path / "boxes.jsonl",
            box_threshold=0.0,
            resolution=32,
            storage="uint8",
            workers=0,
            progress=False,
            log=lambda _: None,
        )
    )
    assert prep.counts["grounding_images"] > 0


def test_owlv2_boxes_are_in_the_pixels_of_the_image_padded_to_a_square(tmp_path):
    """The boxes of transformers' own post-processing with the padded square's size, clipped to the image."""
    import torch
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    model_dir = tiny_owlv2(tmp_path / "owlv2", seed=1)
    image = np.random.default_rng(1).integers(0, 255, (50, 80, 3), dtype=np.uint8)  # H 50, W 80
    found = load_detector("owlv2", model_dir).detect([image], [["a dog"]], 0.0)[0]
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = Owlv2ForObjectDetection.from_pretrained(model_dir, local_files_only=True).eval()
    enc = processor.tokenizer(["a dog"], padding="max_length", max_length=16, return_tensors="pt")
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels
        )
    ref = processor.image_processor.post_process_object_detection(
        out, threshold=-1.0, target_sizes=[(80, 80)]
    )[0]
    boxes = [
        (max(b[0], 0), max(b[1], 0), min(b[2], 80), min(b[3], 50)) for b in ref["boxes"].tolist()
    ]
    assert found and all(d.label == "a dog" for d in found)
    scores = ref["scores"].tolist()
    for d in found:
        assert any(
            max(abs(a - b) for a, b in zip(box, d.box)) <= 0.0051 and abs(score - d.score) <= 5.1e-5
            for box, score in zip(boxes, scores)
        ), d


def test_a_missing_detector_is_named(world, tmp_path):
    base, _, model, _ = world
    gone = tmp_path / "not-there"
    proc = _run(_cmd(base / "raw", gone, tmp_path / "b.jsonl"))
    assert proc.returncode == 2
    assert (
        f"--detector-path: folder not found: {gone}" in proc.stderr
        and "save_pretrained" in proc.stderr
    )
    assert not list(tmp_path.glob("b.jsonl*"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((model / "config.json").read_text())
    with pytest.raises(InputError, match=rf"no model weights in {re.escape(str(partial))}"):
        check_folder("grounding-dino", partial)
    (partial / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    with pytest.raises(InputError, match="no processor files"):
        check_folder("grounding-dino", partial)
    with pytest.raises(InputError, match="holds a 'grounding-dino' model, not the 'owlv2'"):
        check_folder("owlv2", model)
