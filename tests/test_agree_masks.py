"""agree.masks and agree.pixels: the one fill of masked pixels, mask-box files, the normalisation they share."""

import json

import numpy as np
import pytest
import torch

from agree.io import InputError
from agree.masks import (
    FILL_NORMALISED,
    FILL_RGB,
    MaskBoxes,
    check_box,
    fill_boxes,
    pixel_box,
    record,
)
from agree.pixels import CLIP_MEAN, CLIP_STD, normalise, normalised
from clip.transform import MEAN, STD, array_to_tensor


def _all_bytes() -> np.ndarray:
    """A 16 x 16 uint8 RGB image in which every channel takes all 256 values."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return np.stack([values, values.T, values[::-1]], -1)


def test_constants_are_clips_and_the_fill_is_its_mean_colour():
    assert CLIP_MEAN == tuple(MEAN) and CLIP_STD == tuple(STD)
    assert FILL_RGB == (123, 117, 104)  # round(255 * mean), the release's masked colour
    assert np.abs(FILL_NORMALISED).max() < 0.02  # about 0 once normalised


def test_normalise_is_what_clip_computes_for_every_byte_value():
    arr = _all_bytes()
    assert torch.equal(torch.from_numpy(normalise(arr)), array_to_tensor(arr, 16, is_train=False))
    f = normalise(arr)
    assert normalised(f) is f  # float32 is used as stored
    with pytest.raises(ValueError, match="unsupported image array"):
        normalised(np.zeros((4, 4), np.uint8))


def test_filling_commutes_with_the_normalisation_bit_for_bit():
    arr = _all_bytes()
    boxes = [(0, 0, 3, 2), (5, 4, 16, 16), (7, 7, 8, 8)]
    filled = fill_boxes(arr, boxes)
    assert np.array_equal(normalise(filled), fill_boxes(normalise(arr), boxes))
    inside = np.zeros((16, 16), bool)
    for x0, y0, x1, y1 in boxes:
        inside[y0:y1, x0:x1] = True
    assert (filled[inside] == FILL_RGB).all() and np.array_equal(filled[~inside], arr[~inside])
    assert not np.array_equal(arr[inside], filled[inside])  # the input is untouched
    # a float64 archive keeps its dtype
    f64 = normalise(arr).astype(np.float64)
    assert fill_boxes(f64, boxes).dtype == np.float64


def test_pixel_boxes_cover_every_touched_pixel_inside_the_image():
    assert pixel_box((2.2, 3.0, 7.5, 9.0), 10, 10) == (2, 3, 8, 9)
    assert pixel_box((-3.5, 8.5, 4.0, 30.0), 10, 10) == (0, 8, 4, 10)
    assert pixel_box((11.0, 0.0, 12.0, 5.0), 10, 10) is None


@pytest.mark.parametrize(
    "box,what",
    [
        ((1.0, 2, 3, 4), "four integers"),
        ((1, 2, 3), "four integers"),
        ((True, 2, 3, 4), "four integers"),
        ((3, 2, 3, 4), "empty or negative"),
        ((-1, 2, 3, 4), "empty or negative"),
        ((0, 0, 17, 4), "outside the 16x16 image"),
    ],
)
def test_bad_boxes_are_refused(box, what):
    with pytest.raises(ValueError, match=what):
        check_box(box, 16, 16) if what.startswith("outside") else fill_boxes(_all_bytes(), [box])


def test_mask_box_file_round_trip_and_errors_name_file_and_line(tmp_path):
    good = tmp_path / "m.boxes.jsonl"
    lines = [record("1_dog", 1, [(0, 0, 2, 2), (3, 3, 5, 6)]), record("2_cat", "2", [[1, 1, 4, 4]])]
    good.write_text("".join(json.dumps(r) + "\n" for r in lines))
    m = MaskBoxes(good)
    assert m.keys() == ["1_dog", "2_cat"] and len(m) == 2 and "1_dog" in m and "3_x" not in m
    assert m.image_id("1_dog") == "1" and m.boxes("1_dog").tolist() == [[0, 0, 2, 2], [3, 3, 5, 6]]
    with pytest.raises(InputError, match="no mask boxes for key '3_x'"):
        m.boxes("3_x")
    for bad, what in (
        ({"key": "a", "image_id": "1", "boxes": [[0, 0, 2.5, 2]]}, "four integers"),
        ({"key": "a", "image_id": "1", "boxes": []}, "non-empty list"),
        ({"key": "a", "boxes": [[0, 0, 1, 1]]}, "missing key 'image_id'"),
        ({"key": "1_dog", "image_id": "1", "boxes": [[0, 0, 1, 1]]}, "duplicate key '1_dog'"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(InputError, match=f"{path}:2: .*{what}"):
            MaskBoxes(path)
    with pytest.raises(InputError, match="mask boxes not found"):
        MaskBoxes(tmp_path / "absent.jsonl")
