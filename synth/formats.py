"""The raw download formats that scripts/prepare_data.py reads, as records and file contents.

Karpathy's split file entries, Flickr30k Entities sentence markup (tokenised, `[/EN#<chain>/<type> ...]`)
and VOC-style box files (1-based inclusive corners), a detector's boxes JSONL line, and Visual
Genome's image_data.json / objects.json entries. See dataprep/ for the readers.
"""

from __future__ import annotations

import io
import re
from typing import Optional, Sequence

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
ENTITY_TYPE = "other"  # Flickr30k Entities' type for anything that is not a person, animal, ...
VG_URL = "https://cs.stanford.edu/people/rak248/VG_100K/{}.jpg"  # only its folder is read
_TOKEN = re.compile(r"\w+|[^\w\s]")

Box = tuple[int, int, int, int]  # 0-based pixel corners, end exclusive


def jpeg_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as a high-quality JPEG without chroma subsampling (same pixels, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """The uint8 (H, W, 3) pixels that a reader of `data` sees."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def tokens(text: str) -> list[str]:
    """Flickr30k-style tokens: words, and each punctuation mark on its own."""
    return _TOKEN.findall(text)


def karpathy_image(
    filename: str, imgid: int, split: str, captions: Sequence[str], first_sentid: int
) -> dict:
    """One `images[]` entry of dataset_flickr30k.json."""
    sentids = list(range(first_sentid, first_sentid + len(captions)))
    sentences = [
        {
            "tokens": [t.lower() for t in tokens(c) if t[0].isalnum()],
            "raw": c,
            "imgid": imgid,
            "sentid": s,
        }
        for c, s in zip(captions, sentids)
    ]
    return {
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": sentids,
        "sentences": sentences,
    }


def entities_sentence(caption: str, phrases: Sequence[tuple[str, int]]) -> str:
    """A caption in Sentences/<id>.txt markup; `phrases` are (substring, chain id) in text order."""
    out, pos = [], 0
    for phrase, chain in phrases:
        start = caption.find(phrase, pos)
        if start < 0 or chain < 1:
            raise ValueError(f"phrase {phrase!r} (chain {chain}) not found in order in {caption!r}")
        out += tokens(caption[pos:start])
        out.append(f"[/EN#{chain}/{ENTITY_TYPE} {' '.join(tokens(phrase))}]")
        pos = start + len(phrase)
    out += tokens(caption[pos:])
    return " ".join(out)


def entities_annotation(
    filename: str, width: int, height: int, boxes: Sequence[tuple[int, Box]]
) -> str:
    """Annotations/<id>.xml: one <object> per (chain id, box), corners 1-based and inclusive."""
    objects = "".join(
        f"<object><name>{chain}</name><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x1}</xmax>"
        f"<ymax>{y1}</ymax></bndbox></object>"
        for chain, (x0, y0, x1, y1) in boxes
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>\n"
    )


def detector_box(filename: str, label: str, box: Box, score: float) -> dict:
    """One line of a detector's boxes JSONL (original pixels, corners)."""
    return {"image": filename, "label": label, "box": [float(v) for v in box], "score": score}


def vg_image_data(image_id: int, width: int, height: int) -> dict:
    """One entry of Visual Genome's image_data.json (not a Flickr30k or COCO image)."""
    return {
        "image_id": image_id,
        "url": VG_URL.format(image_id),
        "width": width,
        "height": height,
        "coco_id": None,
        "flickr_id": None,
    }


def vg_objects(image_id: int, objects: Sequence[tuple[int, Optional[str], Box]]) -> dict:
    """One entry of objects.json from (object id, name or None for a nameless object, box)."""
    return {
        "image_id": image_id,
        "objects": [
            {
                "object_id": oid,
                "x": x0,
                "y": y0,
                "w": x1 - x0,
                "h": y1 - y0,
                "names": [name] if name else [],
                "synsets": [],
            }
            for oid, name, (x0, y0, x1, y1) in objects
        ],
    }
