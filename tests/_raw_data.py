"""Tiny raw datasets in the official download formats, for the tests of scripts/prepare_data.py.

Flickr30k (Karpathy's dataset_flickr30k.json, flickr30k-images/*.jpg, Flickr30k Entities Sentences/*.txt
and Annotations/*.xml), MSCOCO (dataset_coco.json, train2014/, val2014/), Visual Genome
(image_data.json, objects.json, VG_100K/, VG_100K_2/) and a detector's boxes JSONL. Each image shows a
few flat coloured rectangles (the objects) on a smooth background, so a box can be found in the
pixels. `odd=True` adds the odd cases of issue 13 (grayscale, CMYK, PNG inside .jpg, EXIF-rotated,
truncated, missing image, duplicate id, caption without entity, box outside the image).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

COLOURS = {
    "man": (200, 40, 40),
    "woman": (40, 200, 40),
    "dog": (40, 40, 200),
    "ball": (220, 220, 30),
    "shirt": (200, 30, 200),
    "car": (30, 200, 200),
    "tree": (90, 160, 60),
    "hat": (250, 140, 20),
}
PEOPLE = ["man", "woman"]
THINGS = ["dog", "ball", "shirt", "car", "hat"]


@dataclass
class Obj:
    """One object: chain id, word, 0-based [x0, y0, x1, y1) pixel box in the displayed image."""

    chain: int
    word: str
    box: tuple[int, int, int, int]


@dataclass
class RawImage:
    """One image of the tiny world and its five captions (raw text and Entities markup)."""

    stem: str
    split: str
    size: tuple[int, int]
    objects: list[Obj]
    captions: list[str] = field(default_factory=list)
    marked: list[str] = field(default_factory=list)
    source_id: int = 0


def draw(size: tuple[int, int], objects: list[Obj], seed: int) -> Image.Image:
    """A smooth background with each object's box filled with its colour."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(60, 160, size=3)
    img = np.stack(
        [(base[c] + 30 * np.sin(xx / (7 + c) + yy / 11)).clip(0, 255) for c in range(3)], -1
    )
    img = img.astype(np.uint8)
    for o in objects:
        x0, y0, x1, y1 = o.box
        img[y0:y1, x0:x1] = COLOURS[o.word]
    return Image.fromarray(img)


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def captions_for(a: Obj, b: Obj, tree_chain: int) -> tuple[list[str], list[str]]:
    """Five captions in Karpathy's raw form and Flickr30k Entities' tokenised markup."""
    raw = [
        f"A {a.word} plays with a {b.word}.",
        f"The {a.word}'s {b.word} is near a tree.",
        f"A young, smiling {a.word} stands.",
        "Somebody looks at each other.",
        f"Two {b.word}s and a {a.word} outside.",
    ]
    marked = [
        f"[/EN#{a.chain}/people A {a.word}] plays with [/EN#{b.chain}/other a {b.word}] .",
        f"[/EN#{b.chain}/other/people The {a.word} 's {b.word}] is near [/EN#{tree_chain}/scene a tree] .",
        f"[/EN#{a.chain}/people A young , smiling {a.word}] stands .",
        "Somebody looks at [/EN#0/notvisual each other] .",
        f"[/EN#{b.chain}/other Two {b.word}s] and [/EN#{a.chain}/people a {a.word}] outside",
    ]
    return raw, marked


def _world(n: dict[str, int], seed: int, stem_of) -> list[RawImage]:
    rng = np.random.default_rng(seed)
    out, k = [], 0
    for split in ("train", "val", "test"):
        for _ in range(n[split]):
            size = (80, 60) if k % 2 == 0 else (60, 80)
            w, h = size
            a = Obj(10 * k + 1, PEOPLE[k % 2], (4, 6, 4 + w // 3, 6 + h // 2))
            bx0, by0 = w // 2, h // 3
            b = Obj(10 * k + 2, THINGS[k % len(THINGS)], (bx0, by0, bx0 + w // 3, by0 + h // 3))
            im = RawImage(stem_of(k), split, size, [a, b], source_id=k)
            im.captions, im.marked = captions_for(a, b, 10 * k + 3)
            out.append(im)
            k += 1
    rng.shuffle(out)  # splits interleaved, as in the real split files
    return out


def _entities_xml(
    im: RawImage, width_height: Optional[tuple[int, int]] = None, extra: str = ""
) -> str:
    w, h = width_height or im.size
    objs = []
    for o in im.objects:
        x0, y0, x1, y1 = o.box
        names = f"<name>{o.chain}</name>" + (
            f"<name>{o.chain + 5}</name>" if o.word in PEOPLE else ""
        )
        objs.append(
            f"<object>{names}<bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
            f"<ymax>{y1}</ymax></bndbox></object>"
        )
    tree = im.objects[0].chain + 2
    objs.append(f"<object><name>{tree}</name><nobndbox>1</nobndbox></object>")
    objs.append(f"<object><name>{tree + 100}</name><scene>1</scene><nobndbox>1</nobndbox></object>")
    return (
        f"<annotation><filename>{im.stem}.jpg</filename><size><width>{w}</width><height>{h}</height>"
        f"<depth>3</depth></size>{''.join(objs)}{extra}</annotation>"
    )


def make_flickr30k(
    raw: Path,
    n_train: int = 6,
    n_val: int = 2,
    n_test: int = 3,
    entities: bool = True,
    odd: bool = False,
    seed: int = 0,
) -> dict:
    """Write RAW for --dataset flickr30k; return {'images': [RawImage], 'odd': {case: stem}}."""
    images = _world(
        {"train": n_train, "val": n_val, "test": n_test}, seed, lambda k: str(1000000 + 7919 * k)
    )
    folder = raw / "flickr30k-images"
    folder.mkdir(parents=True, exist_ok=True)
    sent_dir, ann_dir = (
        raw / "flickr30k_entities" / "Sentences",
        raw / "flickr30k_entities" / "Annotations",
    )
    if entities:
        sent_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
    odd_cases: dict[str, str] = {}
    train = [im for im in images if im.split == "train"]
    if odd:
        assert n_train >= 8, "the odd cases need 8 training images"
        odd_cases = {
            "grayscale": train[0].stem,
            "cmyk": train[1].stem,
            "png_as_jpg": train[2].stem,
            "exif": train[3].stem,
            "box_outside": train[4].stem,
            "truncated": train[5].stem,
        }
    for k, im in enumerate(images):
        pic = draw(im.size, im.objects, seed + k)
        path = folder / f"{im.stem}.jpg"
        case = next((c for c, s in odd_cases.items() if s == im.stem), None)
        if case == "grayscale":
            path.write_bytes(jpeg_bytes(pic.convert("L")))
        elif case == "cmyk":
            path.write_bytes(jpeg_bytes(pic.convert("CMYK")))
        elif case == "png_as_jpg":
            pic.save(path, "PNG")
        elif (
            case == "exif"
        ):  # stored rotated; EXIF orientation 6 shows it upright (the boxes are upright)
            stored = pic.transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[274] = 6
            path.write_bytes(jpeg_bytes(stored, exif=exif.tobytes()))
        elif case == "truncated":
            data = jpeg_bytes(pic)
            path.write_bytes(data[: len(data) // 2])
        else:
            path.write_bytes(jpeg_bytes(pic))
        if entities:
            (sent_dir / f"{im.stem}.txt").write_text("\n".join(im.marked) + "\n")
            extra = ""
            if case == "box_outside":
                extra = (
                    "<object><name>999</name><bndbox><xmin>500</xmin><ymin>500</ymin><xmax>600</xmax>"
                    "<ymax>600</ymax></bndbox></object>"
                )
                # chain 999 is the first phrase's chain of caption 0 for this image: its box lies outside
                im.marked[0] = im.marked[0].replace(f"/EN#{im.objects[0].chain}/", "/EN#999/", 1)
                (sent_dir / f"{im.stem}.txt").write_text("\n".join(im.marked) + "\n")
            (ann_dir / f"{im.stem}.xml").write_text(_entities_xml(im, extra=extra))
    records = [
        {
            "filename": f"{im.stem}.jpg",
            "imgid": im.source_id,
            "split": im.split,
            "sentids": list(range(5 * im.source_id, 5 * im.source_id + 5)),
            "sentences": [
                {
                    "raw": c,
                    "tokens": c.lower().rstrip(".").split(),
                    "imgid": im.source_id,
                    "sentid": 5 * im.source_id + j,
                }
                for j, c in enumerate(im.captions)
            ],
        }
        for im in images
    ]
    if odd:
        missing = train[-1]
        (folder / f"{missing.stem}.jpg").unlink()
        odd_cases["missing"] = missing.stem
        dup = dict(records[0])
        records.append(dup)
        odd_cases["duplicate"] = records[0]["filename"]
    (raw / "dataset_flickr30k.json").write_text(
        json.dumps({"images": records, "dataset": "flickr30k"})
    )
    return {"images": images, "odd": odd_cases}


def coco_name(split_folder: str, cocoid: int) -> str:
    return f"COCO_{split_folder}_{cocoid:012d}.jpg"


def make_coco(
    raw: Path, n_train: int = 5, n_restval: int = 2, n_val: int = 2, n_test: int = 3, seed: int = 1
) -> dict:
    """Write RAW for --dataset coco (restval images train; some images have 6 or 7 captions)."""
    images = _world(
        {"train": n_train + n_restval, "val": n_val, "test": n_test}, seed, lambda k: str(k)
    )
    records = []
    restval = 0
    for k, im in enumerate(images):
        cocoid = 100 + 37 * im.source_id
        split = im.split
        if split == "train" and restval < n_restval:
            split, restval = "restval", restval + 1
        folder = "train2014" if split in ("train",) else "val2014"
        name = coco_name(folder, cocoid)
        im.stem, im.source_id = Path(name).stem, cocoid
        (raw / folder).mkdir(parents=True, exist_ok=True)
        (raw / folder / name).write_bytes(jpeg_bytes(draw(im.size, im.objects, seed + k)))
        caps = list(im.captions)
        caps[3] = f"A {im.objects[1].word} in a picture. "  # trailing space, as some COCO raws
        caps += [
            f"Extra caption {j} about a {im.objects[0].word}.\n" for j in range(k % 3)
        ]  # 5, 6 or 7 captions
        im.captions = caps
        records.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": k,
                "split": split,
                "cocoid": cocoid,
                "sentids": list(range(len(caps))),
                "sentences": [
                    {"raw": c, "tokens": c.split(), "imgid": k, "sentid": j}
                    for j, c in enumerate(caps)
                ],
            }
        )
    (raw / "dataset_coco.json").write_text(json.dumps({"images": records, "dataset": "coco"}))
    return {"images": images}


def make_registered(
    raw: Path, spec, n_train: int = 3, n_val: int = 2, n_test: int = 2, seed: int = 3
) -> dict:
    """RAW of any dataset of the registry, written from its entry (dataprep.datasets.Dataset): the split
    file with its id key (and folder key), the images in its folders, its gold entities if it has them."""
    images = _world(
        {"train": n_train, "val": n_val, "test": n_test}, seed, lambda k: str(2000000 + 7919 * k)
    )
    for folder in spec.image_folders:
        (raw / folder).mkdir(parents=True, exist_ok=True)
    gold = spec.gold_entities
    if gold is not None:
        gold.sentences_dir(raw).mkdir(parents=True, exist_ok=True)
        gold.annotations_dir(raw).mkdir(parents=True, exist_ok=True)
    records = []
    for k, im in enumerate(images):
        folder = spec.image_folders[k % len(spec.image_folders)] if spec.folder_key else None
        im.source_id = 500 + 3 * k
        name = f"{im.stem}.jpg"
        (raw / (folder or spec.image_folders[0]) / name).write_bytes(
            jpeg_bytes(draw(im.size, im.objects, seed + k))
        )
        rec = {
            "filename": name,
            "split": im.split,
            spec.id_key: im.source_id,
            "sentences": [{"raw": c} for c in im.captions],
        }
        if spec.folder_key:
            rec[spec.folder_key] = folder
        records.append(rec)
        if gold is not None:
            (gold.sentences_dir(raw) / f"{im.stem}.txt").write_text("\n".join(im.marked) + "\n")
            (gold.annotations_dir(raw) / f"{im.stem}.xml").write_text(_entities_xml(im))
    (raw / spec.split_file).write_text(json.dumps({"images": records, "dataset": spec.name}))
    return {"images": images}


def write_boxes(path: Path, images: list[RawImage], outside: Optional[str] = None) -> list[dict]:
    """Detector boxes of every image (labels = object words, one low-score box), as JSONL."""
    lines = []
    for im in images:
        name = f"{im.stem}.jpg"
        for k, o in enumerate(im.objects):
            lines.append(
                {
                    "image": name,
                    "label": o.word,
                    "box": list(map(float, o.box)),
                    "score": 0.9 - 0.1 * k,
                }
            )
        lines.append(
            {"image": name, "label": "tree", "box": [0.0, 0.0, 5.0, 5.0], "score": 0.2}
        )  # below 0.5
        if outside == im.stem:
            lines.append(
                {"image": name, "label": "hat", "box": [900.0, 900.0, 950.0, 950.0], "score": 0.95}
            )
    lines.append(
        {
            "image": "not_in_the_split.jpg",
            "label": "dog",
            "box": [1.0, 1.0, 9.0, 9.0],
            "score": 0.99,
        }
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


def make_vg(vg_raw: Path, heldout: dict[str, list[int]], n: int = 10, seed: int = 2) -> dict:
    """Visual Genome: `n` images with named boxes; heldout = {"flickr_id": [...], "coco_id": [...], any other
    "<key>": [...]} marks some images as copies of val/test images (the converter must exclude them)."""
    rng = np.random.default_rng(seed)
    entries, objects = [], []
    words = PEOPLE + THINGS + ["tree"]
    marks = [(key, v) for key, values in heldout.items() for v in values]
    for k in range(n):
        g = 1 + 3 * k
        w, h = (100, 75) if k % 3 else (75, 100)
        folder = "VG_100K" if k % 2 == 0 else "VG_100K_2"
        objs = []
        for j in range(3):
            word = words[(k + 3 * j) % len(words)]
            x0, y0 = int(rng.integers(5, w // 2)), int(rng.integers(5, h // 2))
            objs.append(Obj(j, word, (x0, y0, x0 + w // 3, y0 + h // 3)))
        entry = {
            "image_id": g,
            "url": f"https://example.invalid/{folder}/{g}.jpg",
            "width": w,
            "height": h,
            "coco_id": None,
            "flickr_id": None,
        }
        if k < len(marks):
            entry[marks[k][0]] = marks[k][1]
        entries.append(entry)
        names = [
            {
                "object_id": 1000 * g + j,
                "x": o.box[0],
                "y": o.box[1],
                "w": o.box[2] - o.box[0],
                "h": o.box[3] - o.box[1],
                "names": [o.word.title() if j == 0 else o.word],
                "synsets": [],
            }
            for j, o in enumerate(objs)
        ]
        names.append(
            {
                "object_id": 1000 * g + 9,
                "x": 0,
                "y": 0,
                "w": 2,
                "h": 2,
                "names": ["speck"],
                "synsets": [],
            }
        )
        objects.append({"image_id": g, "objects": names})
        (vg_raw / folder).mkdir(parents=True, exist_ok=True)
        (vg_raw / folder / f"{g}.jpg").write_bytes(jpeg_bytes(draw((w, h), objs, seed + k)))
    (vg_raw / "image_data.json").write_text(json.dumps(entries))
    (vg_raw / "objects.json").write_text(json.dumps(objects))
    return {"image_data": entries, "objects": objects}
