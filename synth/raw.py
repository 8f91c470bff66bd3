"""Writes the synthetic world as raw downloads: what scripts/prepare_data.py reads for Flickr30k and Visual Genome.

    RAW/flickr30k-images/<stem>.jpg                       train, val and test images (JPEG)
    RAW/dataset_flickr30k.json                            Karpathy's split file (train, then val, then test)
    RAW/flickr30k_entities/Sentences/<stem>.txt           the captions, entity phrases marked (chain k+1 = entity k)
    RAW/flickr30k_entities/Annotations/<stem>.xml         each entity's box
    RAW/detector_boxes.jsonl                              a simulated detector's boxes (synth.detector)
    VGRAW/image_data.json, objects.json, VG_100K/<id>.jpg single-entity images, one object each

Karpathy's `imgid` of training image i is i (the layout's train image_id); val and test images are
keyed by their file stem. The scene metadata of each split is written beside (one JSONL line per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from agree.io import dumps
from synth import captions as C
from synth import formats as F
from synth.detector import detections_for
from synth.render import mask_box, render_scene
from synth.world import SHAPES, iter_split_scenes, sample_single

SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "pretrain": 4, "vg": 5}
UNUSABLE_VG_SHAPE = (
    "crescent"  # every VG object of this word is nameless, so the word is never usable
)
VG_EMPTY_PROB = 0.1  # other words: this share of VG objects is nameless too
SPLIT_FILE = "dataset_flickr30k.json"
IMAGES = "flickr30k-images"
BOXES = "detector_boxes.jsonl"
VG_FOLDER = "VG_100K"

Progress = Callable[[Iterable, int, str], Iterable]
Sink = Callable[[dict], None]


@dataclass(frozen=True)
class RawPaths:
    """The raw folders: `raw` (prepare_data.py's --raw), `vg_raw` (--vg-raw) and the detector boxes (--boxes)."""

    raw: Path
    vg_raw: Path

    @property
    def boxes(self) -> Path:
        """The detector's boxes JSONL."""
        return self.raw / BOXES


def stem_for(seed: int, split: str, index: int) -> int:
    """Flickr-like numeric file stem, distinct across all splits (10 digits, split-coded first digit)."""
    code = SPLIT_CODES[split]
    offset = (seed * 2654435761 + code * 40503) % 10**9
    return (
        code * 10**9 + (index * 982451653 + offset) % 10**9
    )  # 982451653 is prime: a bijection mod 1e9


def vg_id_for(seed: int, k: int) -> int:
    """Visual-Genome-like image id for the k-th VG image (distinct for k < 2.4 million)."""
    return 1 + (k * 7919 + seed * 104729) % 2_400_000


class _FlickrWriter:
    """Writes one image's JPEG, Entities files and detector boxes; collects the split file's entries."""

    def __init__(self, paths: RawPaths, split_file, boxes_file):
        self.images = paths.raw / IMAGES
        self.sentences = paths.raw / "flickr30k_entities" / "Sentences"
        self.annotations = paths.raw / "flickr30k_entities" / "Annotations"
        for d in (self.images, self.sentences, self.annotations):
            d.mkdir(parents=True, exist_ok=True)
        self.split_file, self.boxes_file = split_file, boxes_file
        self.split_file.write(
            b'{"images": ['
        )  # streamed: memory does not grow with the number of images
        self.count = self.sentid = 0

    def add(
        self, split: str, stem: int, imgid: int, image: np.ndarray, caps: list[C.Caption], dets
    ) -> None:
        """One image of `split` with its captions and detections."""
        name = f"{stem}.jpg"
        (self.images / name).write_bytes(F.jpeg_bytes(image))
        texts = [c.text for c in caps]
        self.split_file.write(
            (b", " if self.count else b"")
            + dumps(F.karpathy_image(name, imgid, split, texts, self.sentid))
        )
        self.count += 1
        self.sentid += len(caps)
        lines = [F.entities_sentence(c.text, [(p, k + 1) for p, k in c.mentions]) for c in caps]
        (self.sentences / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        h, w = image.shape[:2]
        boxes = [(d.entity + 1, d.box) for d in dets]
        (self.annotations / f"{stem}.xml").write_text(
            F.entities_annotation(name, w, h, boxes), encoding="utf-8"
        )
        for d in dets:
            self.boxes_file.write(dumps(F.detector_box(name, d.label, d.box, d.score)) + b"\n")

    def close(self) -> None:
        """End the split file's JSON document."""
        self.split_file.write(b'], "dataset": "flickr30k"}')


def write_flickr(
    seed: int,
    sizes: dict[str, int],
    train_captions: int,
    resolution: int,
    paths: RawPaths,
    meta: dict[str, Sink],
    progress: Progress,
) -> dict:
    """Train, val and test as Flickr30k raw files; one metadata line per image into meta[split]."""
    paths.raw.mkdir(parents=True, exist_ok=True)
    imgid = 0
    with open(paths.raw / SPLIT_FILE, "wb") as split_file, open(paths.boxes, "wb") as boxes_file:
        out = _FlickrWriter(paths, split_file, boxes_file)
        for split in ("train", "val", "test"):
            n_caps = train_captions if split == "train" else C.CAPTIONS_PER_TEST_IMAGE
            scenes = iter_split_scenes(seed, SPLIT_CODES[split], sizes[split], resolution)
            for i, scene, rng in progress(scenes, sizes[split], split):
                image = render_scene(scene).image
                stem = stem_for(seed, split, i)
                caps = C.target_captions(scene, rng, n_caps)
                dets = detections_for(scene, rng)
                out.add(split, stem, imgid, image, caps, dets)
                rec = {
                    "index": i,
                    "stem": str(stem),
                    "scene": scene.to_json(),
                    "captions": [c.to_json() for c in caps],
                    "detections": [d.to_json() for d in dets],
                }
                if split == "train":
                    rec["image_id"] = imgid
                elif split == "test":
                    rec["query_ids"] = [n_caps * i + c for c in range(n_caps)]
                meta[split](rec)
                imgid += 1
        out.close()
    return {"raw_images": imgid, "raw_captions": out.sentid}


def write_vg(
    seed: int, per_object: int, resolution: int, paths: RawPaths, meta: Sink, progress: Progress
) -> dict:
    """Visual Genome stand-in: `per_object` single-entity images per shape word, one (maybe nameless) object each."""
    folder = paths.vg_raw / VG_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    image_data, objects = [], []
    jobs = [(si, shape, j) for si, shape in enumerate(SHAPES) for j in range(per_object)]
    for k, (si, shape, j) in enumerate(progress(jobs, len(jobs), "VG")):
        rng = np.random.default_rng([seed, SPLIT_CODES["vg"], si, j])
        scene = sample_single(rng, shape, resolution)
        image = render_scene(scene).image
        vg_id = vg_id_for(seed, k)
        usable = shape != UNUSABLE_VG_SHAPE and (j == 0 or rng.random() >= VG_EMPTY_PROB)
        box = mask_box(scene.entities[0], resolution)
        (folder / f"{vg_id}.jpg").write_bytes(F.jpeg_bytes(image))
        image_data.append(F.vg_image_data(vg_id, resolution, resolution))
        objects.append(F.vg_objects(vg_id, [(1000 * vg_id, shape if usable else None, box)]))
        meta(
            {
                "vg_id": vg_id,
                "vocab": shape,
                "object": shape if usable else "",
                "scene": scene.to_json(),
                "mask_box": list(box) if usable else None,
            }
        )
    (paths.vg_raw / "image_data.json").write_bytes(dumps(image_data))
    (paths.vg_raw / "objects.json").write_bytes(dumps(objects))
    return {"vg_raw_images": len(image_data)}
