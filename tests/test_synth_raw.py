"""The synthetic generator's raw downloads: they parse as the official formats, agree with the scene metadata,
and scripts/prepare_data.py builds exactly the generator's layout from them."""

import io
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from agree.io import read_json, read_jsonl
from synth.render import render_scene
from synth.world import SHAPES, iter_split_scenes
from synth.writer import UNUSABLE_VG_SHAPE, SynthConfig, SynthLayout, generate
from tests._scripts import load_script

R = 64
SEED = 4
SIZES = dict(
    train_images=12,
    train_captions=3,
    val_images=4,
    test_images=6,
    pretrain_images=0,
    vg_per_object=3,
)
CAPTIONS = {"train": 3, "val": 5, "test": 5}
MARK = re.compile(r"\[/EN#(\d+)/(\w+) ([^\[\]]+)\]")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_raw")
    generate(SynthConfig(out=root, seed=SEED, resolution=R, **SIZES), progress=False)
    lay = SynthLayout.under(root)
    meta = {s: read_jsonl(p) for s, p in lay.meta.items() if p.is_file()}
    split_file = read_json(lay.raw.raw / "dataset_flickr30k.json")
    return lay, meta, split_file


def _images(meta):
    return [(split, m) for split in ("train", "val", "test") for m in meta[split]]


def _jpeg(path):
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return np.asarray(im)


def test_raw_files_lie_beside_the_layout(ds):
    lay, _, _ = ds
    root = lay.root
    for rel in (
        "raw/dataset_flickr30k.json",
        "raw/detector_boxes.jsonl",
        "VG_raw/image_data.json",
        "VG_raw/objects.json",
    ):
        assert (root / rel).is_file(), rel
    for rel in (
        "raw/flickr30k-images",
        "raw/flickr30k_entities/Sentences",
        "raw/flickr30k_entities/Annotations",
        "VG_raw/VG_100K",
    ):
        assert (root / rel).is_dir(), rel
    assert read_json(lay.world)["raw"] == {
        "raw": "raw",
        "vg_raw": "VG_raw",
        "boxes": "raw/detector_boxes.jsonl",
    }
    assert not list(root.glob(".synth.*")) and not list(root.rglob("*.part*"))


def test_karpathy_split_file(ds):
    lay, meta, split_file = ds
    images = split_file["images"]
    expected = _images(meta)
    assert len(images) == len(expected)
    assert [e["imgid"] for e in images] == list(range(len(images)))
    sentids = []
    for e, (split, m) in zip(images, expected):
        assert set(e) == {"filename", "imgid", "split", "sentids", "sentences"}
        assert e["split"] == split and e["filename"] == f"{m['stem']}.jpg"
        assert (lay.raw.raw / "flickr30k-images" / e["filename"]).is_file()
        if split == "train":
            assert e["imgid"] == m["image_id"]
        assert len(e["sentences"]) == CAPTIONS[split]
        for s, c, sid in zip(e["sentences"], m["captions"], e["sentids"]):
            assert (
                set(s) == {"raw", "tokens", "imgid", "sentid"}
                and s["sentid"] == sid
                and s["imgid"] == e["imgid"]
            )
            assert s["raw"] == c["text"]
            assert s["tokens"] == re.findall(r"\w+", c["text"].lower())
        sentids += e["sentids"]
    assert sentids == list(range(len(sentids)))


def test_entities_sentences_mark_every_entity_phrase(ds):
    lay, meta, _ = ds
    folder = lay.raw.raw / "flickr30k_entities" / "Sentences"
    for _split, m in _images(meta):
        lines = (folder / f"{m['stem']}.txt").read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(m["captions"])
        for line, cap in zip(lines, m["captions"]):
            marks = MARK.findall(line)
            assert [(int(chain), text) for chain, _, text in marks] == [
                (k + 1, p) for p, k in cap["mentions"]
            ]
            assert all(kind == "other" for _, kind, _ in marks)
            pos = -1
            for _, _, text in marks:
                pos = cap["text"].find(text, pos + 1)
                assert pos >= 0, (text, cap["text"])  # a substring of its raw caption, in order
            plain = MARK.sub(lambda x: x.group(3), line)
            assert "[" not in plain and "]" not in plain
            assert plain.replace(" ", "") == cap["text"].replace(
                " ", ""
            )  # tokenised: only spaces differ


def test_entities_annotations_box_every_entity_inside_the_image(ds):
    lay, meta, _ = ds
    folder = lay.raw.raw / "flickr30k_entities" / "Annotations"
    for _split, m in _images(meta):
        root = ET.parse(folder / f"{m['stem']}.xml").getroot()
        assert root.findtext("filename") == f"{m['stem']}.jpg"
        assert (int(root.findtext("size/width")), int(root.findtext("size/height"))) == (R, R)
        boxes = {}
        for obj in root.iter("object"):
            (name,) = [n.text for n in obj.findall("name")]
            b = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert 1 <= b[0] <= b[2] <= R and 1 <= b[1] <= b[3] <= R, b  # 1-based, inclusive
            boxes[int(name)] = b
        ents = m["scene"]["entities"]
        assert sorted(boxes) == list(range(1, len(ents) + 1))
        for d in m["detections"]:  # the same box as the detector's (0-based, end exclusive)
            x0, y0, x1, y1 = d["box"]
            assert boxes[d["entity"] + 1] == [x0 + 1, y0 + 1, x1, y1]


def test_detector_boxes_jsonl(ds):
    lay, meta, split_file = ds
    lines = read_jsonl(lay.raw.boxes)
    names = {e["filename"] for e in split_file["images"]}
    expected = [(f"{m['stem']}.jpg", d) for _, m in _images(meta) for d in m["detections"]]
    assert len(lines) == len(expected)
    for rec, (name, d) in zip(lines, expected):
        assert set(rec) == {"image", "label", "box", "score"} and rec["image"] in names
        assert rec["image"] == name and rec["label"] == d["label"] and rec["score"] == d["score"]
        x0, y0, x1, y1 = rec["box"]
        assert (
            all(isinstance(v, float) for v in rec["box"])
            and 0 <= x0 < x1 <= R
            and 0 <= y0 < y1 <= R
        )
        assert 0 < rec["score"] < 1
    scores = [r["score"] for r in lines]
    assert min(scores) < 0.5 < max(scores)  # some boxes fall below prepare_data's default threshold


def test_visual_genome_raw_files(ds):
    lay, meta, _ = ds
    image_data = read_json(lay.raw.vg_raw / "image_data.json")
    objects = read_json(lay.raw.vg_raw / "objects.json")
    assert (
        len(image_data) == len(objects) == len(meta["vg"]) == len(SHAPES) * SIZES["vg_per_object"]
    )
    for info, objs, m in zip(image_data, objects, meta["vg"]):
        assert info["image_id"] == objs["image_id"] == m["vg_id"]
        assert (info["width"], info["height"]) == (R, R) and "/VG_100K/" in info["url"]
        assert _jpeg(lay.raw.vg_raw / "VG_100K" / f"{m['vg_id']}.jpg").shape == (R, R, 3)
        (obj,) = objs["objects"]
        assert obj["names"] == ([m["vocab"]] if m["object"] else [])
        assert (
            0 <= obj["x"]
            and obj["x"] + obj["w"] <= R
            and 0 <= obj["y"]
            and obj["y"] + obj["h"] <= R
        )
        if m["object"]:
            assert [obj["x"], obj["y"], obj["x"] + obj["w"], obj["y"] + obj["h"]] == m["mask_box"]
    assert not any(m["object"] for m in meta["vg"] if m["vocab"] == UNUSABLE_VG_SHAPE)


def test_jpegs_hold_the_rendered_scenes(ds):
    lay, meta, _ = ds
    folder = lay.raw.raw / "flickr30k-images"
    for i, scene, _ in iter_split_scenes(SEED, 1, SIZES["train_images"], R):
        rendered = render_scene(scene).image.astype(int)
        stored = _jpeg(folder / f"{meta['train'][i]['stem']}.jpg").astype(int)
        assert stored.shape == (R, R, 3)
        diff = np.abs(stored - rendered)
        assert diff.mean() < 5.0 and diff.max() <= 40, (i, diff.mean(), diff.max())


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_prepare_data_rebuilds_the_generators_layout_from_the_raw_files(ds, tmp_path):
    lay, _, _ = ds
    raw = lay.raw
    out = tmp_path / "again"
    script = load_script("scripts/prepare_data.py")
    assert (
        script.main(
            [
                "--dataset",
                "flickr30k",
                "--raw",
                str(raw.raw),
                "--vg-raw",
                str(raw.vg_raw),
                "--boxes",
                str(raw.boxes),
                "--out",
                str(out),
                "--resolution",
                str(R),
                "--storage",
                "uint8",
                "--vg-per-word",
                str(SIZES["vg_per_object"]),
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    again = SynthLayout.under(out)
    for a, b in ((lay.data_dir, again.data_dir), (lay.vg_dir, again.vg_dir)):
        mine, theirs = _files(a), _files(b)
        assert mine.keys() == theirs.keys() and len(mine) >= 4
        for name in mine:
            assert mine[name] == theirs[name], name


def test_gold_entities_boxes_also_ground_the_captions(ds, tmp_path):
    lay, meta, _ = ds
    script = load_script("scripts/prepare_data.py")
    out = tmp_path / "gold"
    assert (
        script.main(
            [
                "--raw",
                str(lay.raw.raw),
                "--vg-raw",
                str(lay.raw.vg_raw),
                "--out",
                str(out),
                "--resolution",
                str(R),
                "--storage",
                "uint8",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    recs = read_jsonl(SynthLayout.under(out).train_jsonl)
    caps = [c for m in meta["train"] for c in m["captions"]]
    assert len(recs) == len(caps)
    for rec, cap in zip(recs, caps):
        # a gold label is the head word of an entity phrase: the shape it names, in text order, score 1.0
        heads = list(dict.fromkeys(p.split()[-1] for p, _ in cap["mentions"]))
        assert rec["preds"] == [{h: 1.0} for h in heads]
    assert SynthLayout.under(out).grounding_boxes.is_file()


def test_a_bad_caption_phrase_is_a_clear_error():
    from synth.formats import entities_sentence

    assert (
        entities_sentence("a red circle.", [("a red circle", 1)]) == "[/EN#1/other a red circle] ."
    )
    with pytest.raises(ValueError, match="not found"):
        entities_sentence("a red circle.", [("a blue star", 1)])
    with pytest.raises(ValueError, match="not found"):
        entities_sentence(
            "a red circle and a star.", [("a star", 2), ("a red circle", 1)]
        )  # out of order
