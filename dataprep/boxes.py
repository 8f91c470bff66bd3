"""Boxes from any detector (GLIP, Grounding DINO, OWL-ViT...), one JSON object per line:

    {"image": "<file name>", "label": "<phrase>", "box": [x0, y0, x1, y1], "score": s}

in the pixels of the original image as displayed (EXIF orientation applied, as detectors read it).
`image` is matched by file name (a leading folder is ignored). Labels are normalised (lower case,
single spaces). A malformed line stops the run; a box with no area is skipped (counted).
"""

from __future__ import annotations

import math
import os
from pathlib import PurePosixPath

from agree.io import InputError, iter_jsonl
from dataprep.geometry import box_valid
from dataprep.grounding import Detection, normalise_label
from dataprep.skips import SkipLog


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_boxes(path: str | os.PathLike, skips: SkipLog) -> tuple[dict[str, list[Detection]], int]:
    """(file name -> its detections in file order, number of boxes read)."""
    out: dict[str, list[Detection]] = {}
    n = 0
    for lineno, rec in iter_jsonl(path, ("image", "label", "box", "score")):
        where = f"{path}:{lineno}"
        image, label, box, score = rec["image"], rec["label"], rec["box"], rec["score"]
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"{where}: 'image' must be a file name")
        if not isinstance(label, str) or not normalise_label(label):
            raise InputError(f"{where}: 'label' must be a non-empty string")
        if not isinstance(box, list) or len(box) != 4 or not all(_number(v) for v in box):
            raise InputError(f"{where}: 'box' must be [x0, y0, x1, y1] (four finite numbers)")
        if not _number(score):
            raise InputError(f"{where}: 'score' must be a finite number")
        n += 1
        corners = tuple(float(v) for v in box)
        if not box_valid(corners):
            skips.skip("boxes", f"{where}: box {box} has no area (x1 <= x0 or y1 <= y0)")
            continue
        name = PurePosixPath(image.strip().replace("\\", "/")).name
        out.setdefault(name, []).append(Detection(normalise_label(label), corners, float(score)))
    return out, n
