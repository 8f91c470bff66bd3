"""The generated synthetic dataset: the layout's files and schemas, truthful captions, real masks, hard negatives.

The layout is built from the generator's raw files by prepare_data's pipeline, so segs are the Entities
phrases (the captions' entity mentions), preds come from the simulated detector's boxes, images went
through JPEG (colours are compared within JPEG_TOL), and objects and VG/ follow prepare_data's rules.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from agree.images import BoxMasks, ImageArchive
from agree.io import read_json, read_jsonl
from agree.masks import MaskBoxes
from synth.detector import THRESHOLD
from synth.render import MASK_FILL_RAW
from synth.world import COLOURS, SHAPES
from synth.writer import UNUSABLE_VG_SHAPE, SynthConfig, SynthLayout, generate

R = 64
SIZES = dict(train_images=30, val_images=6, test_images=20, pretrain_images=16, vg_per_object=4)
SIZE_CLASS = {"small": "small", "little": "small", "large": "large", "big": "large"}
STEM = re.compile(r"^[1-9][0-9]{9}$")
JPEG_TOL = 8  # largest per-channel difference from an entity's colour still counted as that colour


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    counts = generate(SynthConfig(out=root, seed=3, resolution=R, **SIZES), progress=False)
    lay = SynthLayout.under(root)
    meta = {s: read_jsonl(p) for s, p in lay.meta.items()}
    return lay, meta, counts


def _npz(path):
    z = np.load(path, allow_pickle=False)
    return {k: z[k] for k in z.files}


def _masks(boxes, images):
    """Masked images by key, drawn from a mask-box file (the default --masks boxes) over its image archive."""
    m = BoxMasks(MaskBoxes(boxes), ImageArchive(images))
    return {k: m[k] for k in m.boxes.keys()}


# ------------------------------------------------------------------ layout and schemas (docs/data.md, File formats)
def test_every_spec_file_exists(ds):
    lay, _, _ = ds
    root = lay.root
    expected = [
        "datasets/flickr30k_images/annotation/flickr30k_train_pred.jsonl",
        "datasets/flickr30k_images/annotation/flickr30k_train_images.npz",
        "datasets/flickr30k_images/annotation/flickr30k_val.json",
        "datasets/flickr30k_images/annotation/flickr30k_val_images.npz",
        "datasets/flickr30k_images/annotation/flickr30k_test_images.npz",
        "datasets/flickr30k_images/annotation/flickr30k_test_texts.jsonl",
        "datasets/flickr30k_images/annotation/flickr30k_test_images.jsonl",
        "datasets/flickr30k_images/annotation/flickr30k_test_texts_segs.jsonl",
        "datasets/flickr30k_images/objects/flickr30k_train_imgs_objs.jsonl",
        "datasets/flickr30k_images/objects/flickr30k_val_imgs_objs.jsonl",
        "datasets/flickr30k_images/objects/flickr30k_test_imgs_objs.jsonl",
        "datasets/flickr30k_images/flickr30k_visual_grounding.224.boxes.jsonl",
        "VG/VG_images.224.npz",
        "VG/VG_mask_boxes.224.jsonl",
        "VG/vocab_VG_images_objs.jsonl",
        "pretrain/pretrain_pred.jsonl",
        "pretrain/pretrain_images.npz",
    ]
    for rel in expected:
        assert (root / rel).is_file(), rel
    assert not list(root.rglob("*visual_grounding*.npz")) and not list(
        root.rglob("VG_mask_images*")
    )
    assert not list(root.rglob("*.part*")), "temporary files left behind"


def test_all_image_arrays_are_raw_uint8(ds):
    lay, _, _ = ds
    for path in (
        lay.train_npz,
        lay.val_npz,
        lay.test_npz,
        lay.vg_images,
        lay.pretrain_npz,
    ):
        arrays = _npz(path)
        assert arrays, path
        for k, a in arrays.items():
            assert a.dtype == np.uint8 and a.shape == (R, R, 3), (path, k)


def test_train_records_and_image_keys(ds):
    lay, meta, _ = ds
    recs = read_jsonl(lay.train_jsonl)
    images = _npz(lay.train_npz)
    assert len(recs) == 5 * SIZES["train_images"]
    stems = {}
    for rec in recs:
        assert set(rec) == {"image", "caption", "image_id", "segs", "preds"}
        assert isinstance(rec["image_id"], int) and str(rec["image_id"]) in images
        m = re.fullmatch(r"flickr30k-images/(\d+)\.jpg", rec["image"])
        assert m and STEM.match(m.group(1))
        assert stems.setdefault(rec["image_id"], m.group(1)) == m.group(1)  # one stem per image id
        assert isinstance(rec["caption"], str) and rec["caption"]
        assert all(isinstance(s, str) and s for s in rec["segs"])
        for p in rec["preds"]:
            assert isinstance(p, dict) and len(p) == 1
            ((label, score),) = p.items()
            assert isinstance(label, str) and isinstance(score, float) and 0 < score < 1
    assert set(images) == {str(i) for i in stems}
    assert len(set(stems.values())) == len(stems)
    assert [m["stem"] for m in meta["train"]] == [stems[i] for i in range(len(stems))]


def test_segs_are_the_entity_phrases_of_the_caption(ds):
    lay, meta, _ = ds
    recs = read_jsonl(lay.train_jsonl)
    caps = [c for m in meta["train"] for c in m["captions"]]
    assert len(recs) == len(caps)
    for rec, cap in zip(recs, caps):
        assert rec["caption"] == cap["text"]
        assert rec["segs"] == list(dict.fromkeys(p for p, _ in cap["mentions"]))
        assert rec["segs"] and all(s in rec["caption"] for s in rec["segs"])


def test_val_json_and_keys(ds):
    lay, meta, _ = ds
    val = read_json(lay.val_json)
    images = _npz(lay.val_npz)
    assert isinstance(val, list) and len(val) == SIZES["val_images"]
    assert set(images) == {str(i) for i in range(len(val))}
    for i, entry in enumerate(val):
        assert set(entry) == {"image", "caption"}
        assert entry["image"] == f"flickr30k-images/{meta['val'][i]['stem']}.jpg"
        assert len(entry["caption"]) == 5 and len(set(entry["caption"])) == 5
        assert all(isinstance(c, str) for c in entry["caption"])


def test_test_ground_truth_is_flickr_like(ds):
    lay, meta, _ = ds
    texts, imgs, segs = (
        read_jsonl(lay.test_texts),
        read_jsonl(lay.test_images),
        read_jsonl(lay.test_segs),
    )
    images = _npz(lay.test_npz)
    n = SIZES["test_images"]
    assert len(imgs) == n and len(texts) == len(segs) == 5 * n
    assert [t["query_id"] for t in texts] == list(range(5 * n))
    for k, rec in enumerate(imgs):
        assert set(rec) == {"image_id", "item_ids"}
        assert isinstance(rec["image_id"], int) and STEM.match(str(rec["image_id"]))
        assert str(rec["image_id"]) in images and str(rec["image_id"]) == meta["test"][k]["stem"]
        assert rec["item_ids"] == list(range(5 * k, 5 * k + 5))
        for q in rec["item_ids"]:
            assert texts[q]["item_ids"] == [rec["image_id"]]
    assert set(images) == {str(r["image_id"]) for r in imgs}
    for t, s in zip(texts, segs):
        assert set(t) == {"query_id", "query_text", "item_ids"} and set(s) == {
            "query_id",
            "query_text",
            "items",
        }
        assert s["query_id"] == t["query_id"] and s["query_text"] == t["query_text"]
        assert s["items"] and all(item in t["query_text"] for item in s["items"])
    for k, m in enumerate(meta["test"]):
        assert [c["text"] for c in m["captions"]] == [
            texts[5 * k + c]["query_text"] for c in range(5)
        ]


def _detected(m):
    return [d for d in m["detections"] if d["score"] >= THRESHOLD]


def test_objects_files_cover_every_split(ds):
    lay, meta, _ = ds
    for split in ("train", "val", "test"):
        recs = read_jsonl(lay.objects(split))
        assert [r["image_id"] for r in recs] == [m["stem"] for m in meta[split]]
        for r, m in zip(recs, meta[split]):
            present = {e["shape"] for e in m["scene"]["entities"]}
            # VG words named by the captions' entity phrases, then by the detector's labels (their last word)
            named = [p.split()[-1] for c in m["captions"] for p, _ in c["mentions"]]
            named += [d["label"].split()[-1] for d in _detected(m)]
            expected = [w for w in dict.fromkeys(named) if w != UNUSABLE_VG_SHAPE]
            assert r["image_objects"] == expected
            assert set(expected) <= present
    assert any(read_jsonl(lay.objects("train"))[k]["image_objects"] for k in range(3))


def test_stems_are_distinct_across_splits(ds):
    _, meta, _ = ds
    stems = [m["stem"] for s in ("train", "val", "test", "pretrain") for m in meta[s]]
    assert len(stems) == len(set(stems)) and all(STEM.match(s) for s in stems)


def test_vg_vocabulary_images_and_masked_keys(ds):
    lay, meta, _ = ds
    vocab = read_jsonl(lay.vg_vocab)
    vg, vgm = _npz(lay.vg_images), _masks(lay.vg_mask_boxes, lay.vg_images)
    used = {
        w
        for split in ("train", "val", "test")
        for r in read_jsonl(lay.objects(split))
        for w in r["image_objects"]
    }
    assert (
        [v["vocab"] for v in vocab] == sorted(used)
        and UNUSABLE_VG_SHAPE not in used
        and len(used) >= 5
    )
    usable = {}
    for m in meta[
        "vg"
    ]:  # single-entity images of the vocabulary word; nameless objects are never usable
        assert [e["shape"] for e in m["scene"]["entities"]] == [m["vocab"]]
        assert (m["object"] == "") == (m["mask_box"] is None)
        assert m["object"] in ("", m["vocab"]) and (
            m["vocab"] != UNUSABLE_VG_SHAPE or not m["object"]
        )
        if m["object"]:
            usable.setdefault(m["vocab"], set()).add(m["vg_id"])
    listed = []
    for v in vocab:
        assert {o["image_id"] for o in v["objects"]} == usable[v["vocab"]]
        for o in v["objects"]:
            assert set(o) == {"image_id", "object"} and o["object"] == v["vocab"]
            listed.append(o["image_id"])
    assert len(set(listed)) == len(listed) and set(vg) == {str(g) for g in listed}
    assert set(vgm) == {f"{v['vocab']}_{o['image_id']}" for v in vocab for o in v["objects"]}
    assert len(listed) < len(meta["vg"])  # the nameless ones are left out


def test_grounding_keys_cover_every_first_grounded_label(ds):
    lay, meta, _ = ds
    grounding = _masks(lay.grounding_boxes, lay.train_npz)
    needed = set()
    fallback = 0
    for rec in read_jsonl(lay.train_jsonl):
        labels = [label for p in rec["preds"] for label in p if label != "object"]
        stem = Path(rec["image"]).stem
        if labels:
            needed.add(f"{stem}_{labels[0]}")
        else:
            fallback += 1
    assert needed == set(grounding)
    assert (
        fallback > 0
    )  # some captions ground nothing: training's masked-square fallback is exercised


def test_pretrain_split_uses_the_train_format(ds):
    lay, meta, counts = ds
    recs = read_jsonl(lay.pretrain_jsonl)
    images = _npz(lay.pretrain_npz)
    assert len(images) == SIZES["pretrain_images"] == counts["pretrain_images"]
    assert len(recs) == 2 * SIZES["pretrain_images"]
    for rec in recs:
        assert set(rec) == {"image", "caption", "image_id", "segs", "preds"}
        assert str(rec["image_id"]) in images


# ------------------------------------------------------------------ captions tell the truth
def _parse_entities(text):
    """(colour, size class, shape) of every shape word, read from the adjectives right before it."""
    words = re.sub(r"[,.:;]", " ", text).split()
    out = []
    for k, w in enumerate(words):
        if w in SHAPES:
            colour = size = None
            j = k - 1
            while j >= 0 and (words[j] in COLOURS or words[j] in SIZE_CLASS):
                colour = words[j] if words[j] in COLOURS else colour
                size = SIZE_CLASS[words[j]] if words[j] in SIZE_CLASS else size
                j -= 1
            out.append((colour, size, w))
        assert w.rstrip("s") not in SHAPES or w in SHAPES, f"plural shape word in {text!r}"
    return out


def _matches(ent, colour, size, shape):
    return ent["shape"] == shape and colour in (None, ent["colour"]) and size in (None, ent["size"])


def _all_captions(meta):
    for split in ("train", "val", "test", "pretrain"):
        for m in meta[split]:
            for c in m["captions"]:
                yield split, m["scene"], c


def test_every_named_entity_is_in_the_image(ds):
    _, meta, _ = ds
    n = 0
    for split, scene, cap in _all_captions(meta):
        ents = scene["entities"]
        parsed = _parse_entities(cap["text"])
        assert parsed, cap["text"]
        for colour, size, shape in parsed:
            assert any(_matches(e, colour, size, shape) for e in ents), (split, cap["text"], ents)
            n += 1
    assert n > 300


def test_mention_phrases_refer_to_exactly_their_entity(ds):
    _, meta, _ = ds
    for split, scene, cap in _all_captions(meta):
        ents = scene["entities"]
        pos = -1
        for phrase, idx in cap["mentions"]:
            assert phrase in cap["text"]
            found = cap["text"].find(phrase, pos + 1)
            assert found > pos, "mentions are listed in text order"
            pos = found
            ((colour, size, shape),) = _parse_entities(phrase)
            assert _matches(ents[idx], colour, size, shape), (phrase, ents[idx])
            others = [
                e for k, e in enumerate(ents) if k != idx and _matches(e, colour, size, shape)
            ]
            # pre-training captions name shapes only ("a star"), so two stars share a phrase there
            assert not others or split == "pretrain", f"{phrase!r} is ambiguous in {cap['text']!r}"


def test_spatial_size_and_count_claims_hold(ds):
    _, meta, _ = ds
    seen = set()
    for _split, scene, cap in _all_captions(meta):
        ents = scene["entities"]
        c = [np.array(e["center"]) for e in ents]
        for claim in cap["claims"]:
            kind = claim[0]
            seen.add(kind if kind != "rel" else claim[2])
            if kind == "rel":
                _, i, rel, j = claim
                dx, dy = c[j] - c[i]
                if rel == "left":
                    assert dx > 0.1 * R and "left" in cap["text"]
                elif rel == "right":
                    assert dx < -0.1 * R and "right" in cap["text"]
                elif rel == "above":
                    assert dy > 0.1 * R and re.search(r"\b(above|over)\b", cap["text"])
                elif rel == "below":
                    assert dy < -0.1 * R and re.search(r"\b(below|under|beneath)\b", cap["text"])
                elif rel == "near":
                    assert np.hypot(dx, dy) < 2 * (ents[i]["half"] + ents[j]["half"])
                elif rel == "front":
                    assert i > j  # drawn later
                    bi, bj = ents[i]["bbox"], ents[j]["bbox"]
                    assert bi[0] < bj[2] and bj[0] < bi[2] and bi[1] < bj[3] and bj[1] < bi[3]
                else:
                    raise AssertionError(claim)
            elif kind == "region":
                _, i, region = claim
                x, y = c[i] / R
                for part in region.split():
                    assert {
                        "left": x < 0.4,
                        "right": x > 0.6,
                        "top": y < 0.4,
                        "bottom": y > 0.6,
                        "middle": abs(x - 0.5) < 0.15 and abs(y - 0.5) < 0.15,
                    }[part], (claim, x, y)
            elif kind == "count":
                assert claim[1] == len(ents)
                assert len(cap["mentions"]) == len(ents)
            elif kind == "larger":
                _, i, j = claim
                assert ents[i]["size"] == "large" and ents[j]["size"] == "small"
                assert ents[i]["half"] > 1.3 * ents[j]["half"]
            elif kind == "between":
                _, i, j, k = claim
                lo, hi = sorted((c[j][0], c[k][0]))
                assert lo < c[i][0] < hi
            else:
                raise AssertionError(claim)
    assert {"left", "right", "above", "below", "near", "region", "count"} <= seen


def test_five_distinct_captions_per_target_image(ds):
    _, meta, _ = ds
    for split in ("train", "val", "test"):
        for m in meta[split]:
            texts = [c["text"] for c in m["captions"]]
            assert len(texts) == 5 and len(set(texts)) == 5


def test_pretraining_captions_are_simpler_than_target_captions(ds):
    _, meta, _ = ds
    target_words, pretrain_words = set(), set()
    target_templates, pretrain_templates = set(), set()
    shapes_only = (
        0  # pre-training captions that name no colour: shapes must be recognised, not just colours
    )
    for split, scene, cap in _all_captions(meta):
        words = set(re.sub(r"[,.:;]", " ", cap["text"]).split())
        if split == "pretrain":
            tokens = re.sub(r"[,.:;]", " ", cap["text"]).split()
            # colours, sizes and shapes are named apart: no colour or size word qualifies a shape word
            assert not any(
                (a in COLOURS or a in SIZE_CLASS) and b in SHAPES
                for a, b in zip(tokens, tokens[1:])
            ), cap["text"]
            pretrain_words |= words
            pretrain_templates.add(cap["template"])
            shapes_only += not words & set(COLOURS)
            assert not cap["claims"][1:] and cap["claims"][0] == ["count", len(scene["entities"])]
        else:
            target_words |= words
            target_templates.add(cap["template"])
    assert not target_templates & pretrain_templates
    assert shapes_only > 0
    allowed = (
        set(SHAPES)
        | set(COLOURS)
        | {"small", "large"}
        | {"a", "an", "of", "and", "in", "photo", "image", "picture", "colours", "sizes", "shapes"}
    )
    assert pretrain_words <= allowed, pretrain_words - allowed
    relational = {
        "left",
        "right",
        "above",
        "below",
        "next",
        "between",
        "bigger",
        "smaller",
        "top",
        "bottom",
    }
    assert relational & target_words and not relational & pretrain_words


def _expected_preds(m, text):
    """prepare_data's detector rule: labels >= threshold occurring in the caption as words, highest score first."""
    found = [
        d
        for d in _detected(m)
        if re.search(r"(?<!\w)" + re.escape(d["label"]) + r"(?!\w)", text, re.I)
    ]
    return [
        {d["label"]: d["score"]} for d in sorted(found, key=lambda d: (-d["score"], d["label"]))
    ]


def test_preds_ground_entities_that_the_caption_mentions(ds):
    lay, meta, _ = ds
    recs = iter(read_jsonl(lay.train_jsonl))
    grounded = 0
    for m in meta["train"]:
        ents = m["scene"]["entities"]
        entity_of = {d["label"]: d["entity"] for d in m["detections"]}
        for cap in m["captions"]:
            rec = next(recs)
            assert rec["preds"] == _expected_preds(m, cap["text"])
            mentioned = {idx for _, idx in cap["mentions"]}
            for p in rec["preds"]:
                ((label, _),) = p.items()
                idx = entity_of[label]
                assert idx in mentioned
                ((colour, size, shape),) = _parse_entities(label)
                assert _matches(ents[idx], colour, size, shape)
                assert sum(_matches(e, colour, size, shape) for e in ents) == 1, label
                grounded += 1
    assert grounded > 50


# ------------------------------------------------------------------ masks really cover the entity
def _box_mask(box):
    x0, y0, x1, y1 = box
    inside = np.zeros((R, R), bool)
    inside[y0:y1, x0:x1] = True
    return inside


def _coloured(image, rgb):
    return np.all(np.abs(image.astype(int) - np.array(rgb)) <= JPEG_TOL, axis=-1)


def _check_masked(original, masked, box, ent):
    inside = _box_mask(box)
    assert np.array_equal(masked[~inside], original[~inside]), "pixels outside the box changed"
    assert np.all(masked[inside] == np.array(MASK_FILL_RAW, np.uint8))
    changed = np.any(masked != original, axis=-1)
    assert changed.sum() >= 0.95 * inside.sum()
    bx0, by0, bx1, by1 = ent["bbox"]
    x0, y0, x1, y1 = box
    assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1, "box does not contain the entity"
    visible = _coloured(original, ent["rgb"]) & inside
    assert visible.sum() >= 6, "the entity is not where its metadata says"
    assert not np.any(_coloured(masked, ent["rgb"]) & inside)


def test_grounding_images_mask_the_grounded_entity(ds):
    lay, meta, _ = ds
    train, grounding = _npz(lay.train_npz), _masks(lay.grounding_boxes, lay.train_npz)
    recs = iter(read_jsonl(lay.train_jsonl))
    keys = set()
    for m in meta["train"]:
        by_label = {d["label"]: d for d in m["detections"]}
        for _ in m["captions"]:
            preds = next(recs)["preds"]
            if not preds:
                continue
            ((label, _),) = preds[0].items()
            d = by_label[label]
            key = f"{m['stem']}_{label}"
            keys.add(key)
            _check_masked(
                train[str(m["image_id"])],
                grounding[key],
                d["box"],
                m["scene"]["entities"][d["entity"]],
            )
    assert keys == set(grounding) and keys


def test_vg_masked_images_differ_exactly_where_the_object_is(ds):
    lay, meta, _ = ds
    vg, vgm = _npz(lay.vg_images), _masks(lay.vg_mask_boxes, lay.vg_images)
    words = {v["vocab"] for v in read_jsonl(lay.vg_vocab)}
    n = 0
    for m in meta["vg"]:
        if not m["object"] or m["vocab"] not in words:
            continue
        _check_masked(
            vg[str(m["vg_id"])],
            vgm[f"{m['vocab']}_{m['vg_id']}"],
            m["mask_box"],
            m["scene"]["entities"][0],
        )
        n += 1
    assert n == len(vgm)


def test_images_show_their_entities(ds):
    lay, meta, _ = ds
    for split, path, key in (("train", lay.train_npz, "image_id"), ("test", lay.test_npz, "stem")):
        arrays = _npz(path)
        for m in meta[split]:
            img = arrays[str(m[key])]
            for e in m["scene"]["entities"]:
                x0, y0, x1, y1 = e["bbox"]
                assert _coloured(img[y0:y1, x0:x1], e["rgb"]).sum() >= 6, (split, m[key], e)


# ------------------------------------------------------------------ hard negatives
def test_hard_negative_partners_share_objects_not_bindings(ds):
    _, meta, _ = ds
    pairs = 0
    for split in ("train", "val", "test", "pretrain"):
        scenes = [m["scene"] for m in meta[split]]
        for k, s in enumerate(scenes):
            p = s["partner"]
            if p is None:
                continue
            pairs += 1
            assert p["of"] == k - 1
            a, b = scenes[k - 1]["entities"], s["entities"]
            spec = lambda es: sorted((e["shape"], e["colour"], e["size"]) for e in es)  # noqa: E731
            assert (spec(a) == spec(b)) == (p["kind"] == "mirror")
            assert sorted(e["shape"] for e in a) == sorted(e["shape"] for e in b)
            if p["kind"] == "binding":
                assert sorted(e["colour"] for e in a) == sorted(e["colour"] for e in b)
                assert sorted(e["size"] for e in a) == sorted(e["size"] for e in b)
            elif p["kind"] == "size":
                assert sorted((e["shape"], e["colour"]) for e in a) == sorted(
                    (e["shape"], e["colour"]) for e in b
                )
            elif p["kind"] == "mirror":
                for ea, eb in zip(a, b):
                    assert ea["center"][0] == pytest.approx(R - eb["center"][0], abs=1e-2)
            else:
                assert p["kind"] == "recolour"
    assert pairs >= 3
