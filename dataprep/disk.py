"""Disk use of a prepared layout, from the file formats: the bytes of each image archive and mask file that
prepare_data.py writes, for given counts (the disk table of docs/data.md), and the check of those
formulas against a layout on disk (scripts/disk_usage.py --check).

An `.npz` archive (agree.npz: zip, stored, no compression) holds one `.npy` per key: a 128-byte header
and the raw array (R x R x 3 bytes in uint8, 4x that in float32); each member costs a 30-byte local
header and a 46-byte central-directory entry, each with the member's name ("<key>.npy"), and the
archive a 22-byte end record (zip64 adds 12 bytes per member beyond 4 GiB and a 76-byte end record).
A mask-box file (agree.masks) holds one compact JSON line per mask.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

NPY_HEADER = 128  # bytes before the data of a (R, R, 3) / (3, R, R) array's .npy
ZIP_LOCAL, ZIP_CENTRAL, ZIP_END = 30, 46, 22
ZIP64_MEMBER, ZIP64_END = 12, 76
ZIP64_LIMIT = (1 << 31) - 1  # zipfile's ZIP64_LIMIT
BYTES_PER_VALUE = {"uint8": 1, "float32": 4}


def npy_bytes(storage: str, resolution: int) -> int:
    """One stored image's .npy: header + R x R x 3 values."""
    return NPY_HEADER + 3 * resolution * resolution * BYTES_PER_VALUE[storage]


def npz_bytes(key_lengths: Iterable[int], storage: str, resolution: int) -> int:
    """An archive of one image per key (`key_lengths`: the length of each key, in archive order)."""
    member = npy_bytes(storage, resolution)
    total, offset, beyond = ZIP_END, 0, 0
    for n in key_lengths:
        name = n + len(".npy")
        total += member + ZIP_LOCAL + ZIP_CENTRAL + 2 * name
        beyond += offset > ZIP64_LIMIT
        offset += member + ZIP_LOCAL + name
    if offset > ZIP64_LIMIT:
        total += beyond * ZIP64_MEMBER + ZIP64_END
    return total


def mask_line_bytes(
    key_length: int, id_length: int, boxes: Iterable[tuple[int, int, int, int]]
) -> int:
    """One line of a mask-box file (compact JSON, as agree.io.dumps writes it, and its newline)."""
    box_list = json.dumps([list(b) for b in boxes], separators=(",", ":"))
    return len('{"key":"","image_id":"","boxes":}') + key_length + id_length + len(box_list) + 1


@dataclass(frozen=True)
class Counts:
    """What a layout holds, for the estimate: images per archive and masks, with typical key lengths."""

    train: int
    val: int
    test: int
    grounding_masks: int
    vg_images: int
    vg_masks: int
    key: int = 8  # characters of an image key (image id / file stem)
    mask_key: int = 14  # characters of a mask key ("<stem>_<label>", "<word>_<vg id>")
    mask_line: int = 80  # bytes of a mask-box line (one or two boxes)


def estimate(c: Counts, storage: str, masks: str, resolution: int = 224) -> dict[str, int]:
    """Bytes of the image archives and masks of each folder (dataset folder, VG/) of one layout."""
    images = sum(npz_bytes([c.key] * n, storage, resolution) for n in (c.train, c.val, c.test))
    vg = npz_bytes([c.key] * c.vg_images, storage, resolution)
    if masks == "images":
        grounding = npz_bytes([c.mask_key] * c.grounding_masks, storage, resolution)
        vg_masks = npz_bytes([c.mask_key] * c.vg_masks, storage, resolution)
    else:
        grounding, vg_masks = c.grounding_masks * c.mask_line, c.vg_masks * c.mask_line
    return {
        "images": images,
        "grounding": grounding,
        "vg_images": vg,
        "vg_masks": vg_masks,
        "dataset folder": images + grounding,
        "VG": vg + vg_masks,
    }


def folder_bytes(folder: Path) -> int:
    """Total bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def archive_keys(path: os.PathLike) -> list[str]:
    """The keys of an .npz archive, in order."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return [n[: -len(".npy")] for n in zf.namelist()]


def is_mask_file(path: Path) -> bool:
    """A mask-box file of the layout (<dataset>_visual_grounding.<R>.boxes.jsonl, VG_mask_boxes.<R>.jsonl)."""
    return path.name.endswith(".boxes.jsonl") or path.name.startswith("VG_mask_boxes.")


def check(data_dir: Path, vg_dir: Path, storage: str, resolution: int) -> list[dict]:
    """Per folder of a prepared layout: bytes written, bytes of its archives and mask files, the same predicted
    from the formats (their keys and mask lines), and the rest (captions, objects, manifests: text)."""
    from agree.io import iter_jsonl

    rows = []
    for name, folder in (("dataset folder", Path(data_dir)), ("VG", Path(vg_dir))):
        predicted = actual = 0
        for p in sorted(folder.rglob("*")):
            if p.suffix == ".npz":
                predicted += npz_bytes(map(len, archive_keys(p)), storage, resolution)
            elif is_mask_file(p):
                predicted += sum(
                    mask_line_bytes(len(r["key"]), len(r["image_id"]), r["boxes"])
                    for _, r in iter_jsonl(p)
                )
            else:
                continue
            actual += p.stat().st_size
        written = folder_bytes(folder)
        rows.append(
            {
                "folder": name,
                "written": written,
                "archives and masks": actual,
                "predicted": predicted,
                "text": written - actual,
            }
        )
    return rows
