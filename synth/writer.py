"""Writes a synthetic dataset in the release's layout (spec section 1), atomically and deterministically."""
from __future__ import annotations

import contextlib
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from agree.io import atomic_path, atomic_write, dumps
from agree.entities import grounding_label
from agree.layout import Layout, grounding_key, vg_masked_key
from synth import captions as C
from synth.render import mask_box, masked_copy, render_scene, to_storage
from synth.world import COLOUR_NAMES, SHAPES, Scene, iter_split_scenes, pick, regions, sample_single

FORMAT_VERSION = 1
SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "pretrain": 4, "vg": 5}
UNUSABLE_VG_SHAPE = "crescent"  # every VG entry of this word has an empty description
VG_EMPTY_PROB = 0.1             # other words: this share of entries is unusable too
OBJECT_NOISE_WORD = "shape"     # a detector word with no VG entry at all
OBJECT_NOISE_PROB = 0.08
OBJECT_MISS_PROB = 0.05
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class SynthConfig:
    """What to generate; defaults suit a tiny CLIP with 64-px input trained on CPU."""

    out: Path
    seed: int = 0
    train_images: int = 2000
    val_images: int = 200
    test_images: int = 200
    pretrain_images: int = 4000
    resolution: int = 64
    train_captions: int = 5
    pretrain_captions: int = 2
    vg_per_object: int = 20
    preprocessed: bool = False


class SynthLayout(Layout):
    """The release layout under the dataset root, plus the synthetic-only files (pre-training split, metadata)."""

    @property
    def pretrain_jsonl(self) -> Path:
        """Pre-training captions (training-jsonl format)."""
        return self.root / "pretrain" / "pretrain_pred.jsonl"

    @property
    def pretrain_npz(self) -> Path:
        """Pre-training images, key = str(image_id)."""
        return self.root / "pretrain" / "pretrain_images.npz"

    @property
    def meta(self) -> dict[str, Path]:
        """Scene metadata per split (read by the tests, not by the pipeline)."""
        return {s: self.root / "synthetic" / f"{s}_scenes.jsonl" for s in SPLIT_CODES}

    @property
    def world(self) -> Path:
        """world.json: the generator's config and counts; written last, so it marks a complete dataset."""
        return self.root / "synthetic" / "world.json"


class NpzWriter:
    """Streams arrays into an uncompressed .npz (one entry at a time, fixed timestamps: same bytes each run)."""

    def __init__(self, path: Path):
        self._zf = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._keys: set[str] = set()

    def add(self, key: str, array: np.ndarray) -> None:
        """Store `array` under `key` (np.load(path)[key] returns it)."""
        if key in self._keys:
            raise ValueError(f"duplicate npz key {key!r}")
        self._keys.add(key)
        info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        with self._zf.open(info, "w") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        """Write the central directory."""
        self._zf.close()


class _Sink:
    """A JSONL file written line by line into a temp file that is renamed only on success."""

    def __init__(self, handle):
        self._f = handle
        self.count = 0

    def write(self, record: dict) -> None:
        self._f.write(dumps(record))
        self._f.write(b"\n")
        self.count += 1


def stem_for(seed: int, split: str, index: int) -> int:
    """Flickr-like numeric file stem, distinct across all splits (10 digits, split-coded first digit)."""
    code = SPLIT_CODES[split]
    offset = (seed * 2654435761 + code * 40503) % 10**9
    return code * 10**9 + (index * 982451653 + offset) % 10**9  # 982451653 is prime: a bijection mod 1e9


def vg_id_for(seed: int, k: int) -> int:
    """Visual-Genome-like image id for the k-th VG image (distinct for k < 2.4 million)."""
    return 1 + (k * 7919 + seed * 104729) % 2_400_000


def image_path(split: str, stem: int) -> str:
    """The `image` field of an annotation record."""
    folder = "pretrain-images" if split == "pretrain" else "flickr30k-images"
    return f"{folder}/{stem}.jpg"


def objects_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Detector-like object words of a scene: its shape names, shuffled, with a little noise."""
    words = list(dict.fromkeys(e.shape for e in scene.entities))
    words = [words[int(k)] for k in rng.permutation(len(words))]
    if len(words) >= 2 and rng.random() < OBJECT_MISS_PROB:
        words.pop()
    if rng.random() < OBJECT_NOISE_PROB:
        words.append(OBJECT_NOISE_WORD)
    return words


def vg_description(scene: Scene, rng: np.random.Generator) -> str:
    """A Visual-Genome-like region description of a single-entity scene."""
    e = scene.entities[0]
    size = pick(rng, C.SIZE_WORDS_TARGET[e.size])
    options = [f"{e.colour} {e.shape}", f"{size} {e.colour} {e.shape}",
               f"{C.article([e.colour], False)} {e.colour} {e.shape}"]
    reg = regions(e, scene.resolution)
    if reg:
        options.append(f"{e.colour} {e.shape} {pick(rng, C.REGION_WORDS[pick(rng, reg)])}")
    return pick(rng, options)


def _progress(it, total: int, desc: str, enabled: bool):
    return tqdm(it, total=total, desc=f"{desc:>8}", unit="img", disable=not enabled, leave=False)


class _Outputs:
    """Opens output files as temp files on one ExitStack: all are renamed into place when it closes cleanly."""

    def __init__(self, stack: contextlib.ExitStack):
        self.stack = stack

    def jsonl(self, path: Path) -> _Sink:
        """A JSONL file written record by record."""
        return _Sink(self.stack.enter_context(atomic_write(path)))

    def npz(self, path: Path) -> NpzWriter:
        """An npz archive written array by array."""
        w = NpzWriter(self.stack.enter_context(atomic_path(path)))
        self.stack.callback(w.close)
        return w


def _write_train(cfg: SynthConfig, lay: SynthLayout, out: _Outputs, meta: _Sink, progress: bool) -> dict:
    """Train captions with segs/preds, objects, and the grounding-masked images."""
    r, pre, seed = cfg.resolution, cfg.preprocessed, cfg.seed
    train_npz, grounding = out.npz(lay.train_npz), out.npz(lay.grounding)
    train_jsonl, train_objs = out.jsonl(lay.train_jsonl), out.jsonl(lay.objects("train"))
    for i, scene, rng in _progress(iter_split_scenes(seed, SPLIT_CODES["train"], cfg.train_images, r),
                                   cfg.train_images, "train", progress):
        stored = to_storage(render_scene(scene).image, pre)
        stem = stem_for(seed, "train", i)
        train_npz.add(str(i), stored)
        caps = C.target_captions(scene, rng, cfg.train_captions)
        labels = C.grounding_labels(scene, rng)
        ground: dict[str, int] = {}
        cap_meta = []
        for cap in caps:
            preds, grounded = C.preds_for(scene, cap, rng, labels)
            segs = C.segs_for(cap, rng)
            train_jsonl.write({"image": image_path("train", stem), "caption": cap.text, "image_id": i,
                               "segs": segs, "preds": preds})
            label = grounding_label(preds)
            if label is not None:
                ground[label] = dict(grounded)[label]
            cap_meta.append({**cap.to_json(), "segs": segs, "preds": preds,
                             "grounded": [list(g) for g in grounded], "first_grounded": label})
        boxes = {}
        for label, k in ground.items():
            box = mask_box(scene.entities[k], r)
            grounding.add(grounding_key(str(stem), label), masked_copy(stored, [box]))
            boxes[label] = {"entity": k, "box": list(box)}
        objs = objects_for(scene, rng)
        train_objs.write({"image_id": str(stem), "image_objects": objs})
        meta.write({"index": i, "image_id": i, "stem": str(stem), "scene": scene.to_json(),
                    "captions": cap_meta, "grounding": boxes, "objects": objs})
    return {"train_images": len(train_npz), "train_captions": train_jsonl.count, "grounding_images": len(grounding)}


def _write_val(cfg: SynthConfig, lay: SynthLayout, out: _Outputs, meta: _Sink, progress: bool) -> dict:
    """Validation: one JSON list, 5 captions per image, images keyed by list index."""
    r, pre, seed = cfg.resolution, cfg.preprocessed, cfg.seed
    val_file = out.stack.enter_context(atomic_write(lay.val_json))
    val_npz, val_objs = out.npz(lay.val_npz), out.jsonl(lay.objects("val"))
    val_list = []
    for i, scene, rng in _progress(iter_split_scenes(seed, SPLIT_CODES["val"], cfg.val_images, r),
                                   cfg.val_images, "val", progress):
        stored = to_storage(render_scene(scene).image, pre)
        stem = stem_for(seed, "val", i)
        val_npz.add(str(i), stored)
        caps = C.target_captions(scene, rng)
        val_list.append({"image": image_path("val", stem), "caption": [c.text for c in caps]})
        objs = objects_for(scene, rng)
        val_objs.write({"image_id": str(stem), "image_objects": objs})
        meta.write({"index": i, "stem": str(stem), "scene": scene.to_json(),
                    "captions": [c.to_json() for c in caps], "objects": objs})
    val_file.write(dumps(val_list))
    return {"val_images": len(val_npz)}


def _write_test(cfg: SynthConfig, lay: SynthLayout, out: _Outputs, meta: _Sink, progress: bool) -> dict:
    """Test: image k has queries 5k..5k+4; ground truth both ways and the captions' entity phrases."""
    r, pre, seed = cfg.resolution, cfg.preprocessed, cfg.seed
    test_npz, test_objs = out.npz(lay.test_npz), out.jsonl(lay.objects("test"))
    texts, images, segs_out = out.jsonl(lay.test_texts), out.jsonl(lay.test_images), out.jsonl(lay.test_segs)
    n_caps = C.CAPTIONS_PER_TEST_IMAGE
    for i, scene, rng in _progress(iter_split_scenes(seed, SPLIT_CODES["test"], cfg.test_images, r),
                                   cfg.test_images, "test", progress):
        stored = to_storage(render_scene(scene).image, pre)
        stem = stem_for(seed, "test", i)
        test_npz.add(str(stem), stored)
        caps = C.target_captions(scene, rng, n_caps)
        qids = [n_caps * i + c for c in range(n_caps)]
        images.write({"image_id": stem, "item_ids": qids})
        for q, cap in zip(qids, caps):
            texts.write({"query_id": q, "query_text": cap.text, "item_ids": [stem]})
            segs_out.write({"query_id": q, "query_text": cap.text, "items": [p for p, _ in cap.mentions]})
        objs = objects_for(scene, rng)
        test_objs.write({"image_id": str(stem), "image_objects": objs})
        meta.write({"index": i, "stem": str(stem), "query_ids": qids, "scene": scene.to_json(),
                    "captions": [c.to_json() for c in caps], "objects": objs})
    return {"test_images": len(test_npz), "test_queries": texts.count}


def _write_pretrain(cfg: SynthConfig, lay: SynthLayout, out: _Outputs, meta: _Sink, progress: bool) -> dict:
    """The pre-training split: simpler captions, in the training-jsonl format."""
    r, pre, seed = cfg.resolution, cfg.preprocessed, cfg.seed
    pre_npz, pre_jsonl = out.npz(lay.pretrain_npz), out.jsonl(lay.pretrain_jsonl)
    for i, scene, rng in _progress(iter_split_scenes(seed, SPLIT_CODES["pretrain"], cfg.pretrain_images, r),
                                   cfg.pretrain_images, "pretrain", progress):
        pre_npz.add(str(i), to_storage(render_scene(scene).image, pre))
        stem = stem_for(seed, "pretrain", i)
        caps = C.pretrain_captions(scene, rng, cfg.pretrain_captions)
        labels = C.grounding_labels(scene, rng)
        for cap in caps:
            preds, _ = C.preds_for(scene, cap, rng, labels)
            pre_jsonl.write({"image": image_path("pretrain", stem), "caption": cap.text, "image_id": i,
                             "segs": C.segs_for(cap, rng), "preds": preds})
        meta.write({"index": i, "image_id": i, "stem": str(stem), "scene": scene.to_json(),
                    "captions": [c.to_json() for c in caps]})
    return {"pretrain_images": len(pre_npz), "pretrain_captions": pre_jsonl.count}


def _write_vg(cfg: SynthConfig, lay: SynthLayout, out: _Outputs, meta: _Sink, progress: bool) -> dict:
    """Visual Genome stand-in: single-entity images per object word, and masked copies."""
    r, pre, seed = cfg.resolution, cfg.preprocessed, cfg.seed
    vg_npz, vg_masked, vocab = out.npz(lay.vg_images), out.npz(lay.vg_masked), out.jsonl(lay.vg_vocab)
    k = 0
    bar = tqdm(total=len(SHAPES) * cfg.vg_per_object, desc=f"{'VG':>8}", unit="img",
               disable=not progress, leave=False)
    for si, shape in enumerate(SHAPES):
        entries = []
        for j in range(cfg.vg_per_object):
            rng = np.random.default_rng([seed, SPLIT_CODES["vg"], si, j])
            scene = sample_single(rng, shape, r)
            stored = to_storage(render_scene(scene).image, pre)
            vg_id = vg_id_for(seed, k)
            k += 1
            usable = shape != UNUSABLE_VG_SHAPE and (j == 0 or rng.random() >= VG_EMPTY_PROB)
            desc = vg_description(scene, rng) if usable else ""
            vg_npz.add(str(vg_id), stored)
            box = mask_box(scene.entities[0], r)
            if desc:
                vg_masked.add(vg_masked_key(shape, vg_id), masked_copy(stored, [box]))
            entries.append({"image_id": vg_id, "object": desc})
            meta.write({"vg_id": vg_id, "vocab": shape, "object": desc, "scene": scene.to_json(),
                        "mask_box": list(box) if desc else None})
            bar.update(1)
        vocab.write({"vocab": shape, "objects": entries})
    bar.close()
    return {"vg_images": len(vg_npz), "vg_masked_images": len(vg_masked), "vg_words": vocab.count}


def generate(cfg: SynthConfig, progress: bool = True) -> dict:
    """Generate every file; nothing is renamed into place unless all of them were written."""
    t0 = time.perf_counter()
    lay = SynthLayout.under(cfg.out)
    counts: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        out = _Outputs(stack)
        world_file = stack.enter_context(atomic_write(lay.world))  # entered first, so renamed last
        meta = {s: out.jsonl(p) for s, p in lay.meta.items() if s != "pretrain" or cfg.pretrain_images}
        counts.update(_write_train(cfg, lay, out, meta["train"], progress))
        counts.update(_write_val(cfg, lay, out, meta["val"], progress))
        counts.update(_write_test(cfg, lay, out, meta["test"], progress))
        if cfg.pretrain_images:
            counts.update(_write_pretrain(cfg, lay, out, meta["pretrain"], progress))
        counts.update(_write_vg(cfg, lay, out, meta["vg"], progress))
        world = {"format_version": FORMAT_VERSION, "config": {**asdict(cfg), "out": None},
                 "shapes": list(SHAPES), "colours": list(COLOUR_NAMES),
                 "target_templates": list(C.TARGET_TEMPLATES), "pretrain_templates": list(C.PRETRAIN_TEMPLATES),
                 "unusable_vg_word": UNUSABLE_VG_SHAPE, "counts": counts}
        world_file.write(dumps(world))
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts
