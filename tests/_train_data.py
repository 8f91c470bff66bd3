"""A tiny Flickr30k + Visual Genome dataset in the release layout, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clip.transform import MEAN, STD

COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "pink",
    "brown",
    "grey",
    "orange",
    "purple",
    "gold",
]
ANIMALS = [
    "dog",
    "cat",
    "horse",
    "bird",
    "cow",
    "sheep",
    "goat",
    "duck",
    "fox",
    "bear",
    "lion",
    "mouse",
]
OBJECTS = ["shirt", "ball", "tree", "car", "hat"]


def _image(rng: np.random.Generator, res: int, k: int) -> np.ndarray:
    """A uint8 (R, R, 3) image with a distinctive coloured block pattern for index k."""
    img = rng.integers(0, 40, size=(res, res, 3), dtype=np.uint8)
    cell = res // 4
    y, x = divmod(k % 16, 4)
    img[y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] = [
        (37 * k) % 256,
        (91 * k) % 256,
        (53 * k + 128) % 256,
    ]
    return img


def _float_image(rng: np.random.Generator, res: int) -> np.ndarray:
    """A preprocessed float (3, R, R) image (CLIP-normalised)."""
    raw = rng.random((3, res, res), dtype=np.float32)
    return (
        (raw - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
    ).astype(np.float32)


def make_dataset(
    root: Path,
    n_images: int = 8,
    caps_per_image: int = 2,
    n_val: int = 4,
    res: int = 64,
    seed: int = 0,
) -> dict:
    """Write the files; return a dict of their paths (data_root, vg_root, train, val, ...)."""
    rng = np.random.default_rng(seed)
    data_root = root / "datasets" / "flickr30k_images"
    ann = data_root / "annotation"
    vg_root = root / "VG"
    for d in (ann, data_root / "objects", vg_root):
        d.mkdir(parents=True, exist_ok=True)

    train_lines, train_images, grounding, objects = [], {}, {}, []
    for i in range(n_images):
        stem = str(1000 + i)
        image_id = i + 1
        color, animal = COLORS[i % len(COLORS)], ANIMALS[i % len(ANIMALS)]
        img = _image(rng, res, i)
        train_images[str(image_id)] = img
        for c in range(caps_per_image):
            caption = f"a {color} {animal} {'sits' if c == 0 else 'plays'} near a tree"
            segs = [
                f"a {color} {animal}",
                "a tree",
                "a very long entity with more than seven words here",
            ]
            preds = [{"object": 0.6}, {animal: 0.7}, {"tree": 0.5}]
            train_lines.append(
                {
                    "image": f"flickr30k-images/{stem}.jpg",
                    "caption": caption,
                    "image_id": image_id,
                    "segs": segs,
                    "preds": preds,
                }
            )
        masked = img.copy()
        masked[: res // 2] = 0
        grounding[f"{stem}_{animal}"] = masked
        # the last image has no object with a usable VG entry ('unicorn' has only an empty region, 'thing' no
        # vocabulary line at all): exercises the fallback of docs/method.md §1.3
        objs = ["unicorn", "thing"] if i == n_images - 1 else [OBJECTS[i % len(OBJECTS)], "unicorn"]
        objects.append({"image_id": stem, "image_objects": objs})

    vocab_lines, vg_images, vg_masked = [], {}, {}
    for j, obj in enumerate(OBJECTS):
        entries = []
        for g in (2000 + 10 * j, 2001 + 10 * j):
            entries.append({"image_id": g, "object": f"a {obj} on something"})
            vg_images[str(g)] = _float_image(rng, res) if j % 2 else _image(rng, res, j + 3)
            vg_masked[f"{obj}_{g}"] = np.zeros_like(vg_images[str(g)])
        entries.append({"image_id": 2009 + 10 * j, "object": ""})  # unusable: empty region
        vocab_lines.append({"vocab": obj, "objects": entries})
    vocab_lines.append({"vocab": "unicorn", "objects": [{"image_id": 2999, "object": ""}]})

    val = []
    val_images = {}
    for k in range(n_val):
        color, animal = COLORS[k % len(COLORS)], ANIMALS[k % len(ANIMALS)]
        val.append(
            {
                "image": f"flickr30k-images/{5000 + k}.jpg",
                "caption": [f"a {color} {animal} number {c}" for c in range(5)],
            }
        )
        val_images[str(k)] = _image(rng, res, k)

    paths = {
        "root": root,
        "data_root": data_root,
        "vg_root": vg_root,
        "train": ann / "flickr30k_train_pred.jsonl",
        "train_images": ann / "flickr30k_train_images.npz",
        "val": ann / "flickr30k_val.json",
        "val_images": ann / "flickr30k_val_images.npz",
        "objects": data_root / "objects" / "flickr30k_train_imgs_objs.jsonl",
        "objects_test": data_root / "objects" / "flickr30k_test_imgs_objs.jsonl",
        "objects_val": data_root / "objects" / "flickr30k_val_imgs_objs.jsonl",
        "grounding": data_root / "flickr30k_visual_grounding.224.npz",
        "vg_images": vg_root / "VG_images.224.npz",
        "vg_mask_images": vg_root / "VG_mask_images.224.npz",
        "vg_vocab": vg_root / "vocab_VG_images_objs.jsonl",
    }
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in train_lines))
    paths["val"].write_text(json.dumps(val))
    paths["objects"].write_text("".join(json.dumps(r) + "\n" for r in objects))
    # the release also reads the test and val objects files (other images)
    paths["objects_test"].write_text(
        json.dumps({"image_id": "7000", "image_objects": ["tree"]}) + "\n"
    )
    paths["objects_val"].write_text(
        "".join(
            json.dumps({"image_id": str(5000 + k), "image_objects": ["hat"]}) + "\n"
            for k in range(n_val)
        )
    )
    paths["vg_vocab"].write_text("".join(json.dumps(r) + "\n" for r in vocab_lines))
    np.savez(paths["train_images"], **train_images)
    np.savez(paths["val_images"], **val_images)
    np.savez(paths["grounding"], **grounding)
    np.savez(paths["vg_images"], **vg_images)
    np.savez(paths["vg_mask_images"], **vg_masked)
    return paths


def train_argv(
    paths: dict, logs: Path, name: str, *extra: str, batch_size: int = 4, epochs: int = 1
) -> list[str]:
    """The README recipe's flags, scaled down to the tiny model and this dataset."""
    return [
        "--train-data",
        str(paths["train"]),
        "--val-data",
        str(paths["val"]),
        "--img-key",
        "image",
        "--caption-key",
        "caption",
        "--dataset-type",
        "json",
        "--model",
        "tiny",
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--workers",
        "0",
        "--warmup",
        "2",
        "--lr",
        "1e-3",
        "--wd",
        "0.1",
        "--logs",
        str(logs),
        "--name",
        name,
        "--device",
        "cpu",
        "--log-every-n-steps",
        "1",
        *extra,
    ]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The test machine is shared: one intra-op thread avoids oversubscription (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
