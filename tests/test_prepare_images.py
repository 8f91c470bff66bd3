"""dataprep's image pipeline: equal to clip's eval transform, boxes follow the resize + crop, EXIF, bad files."""

import numpy as np
import pytest
import torch
from PIL import Image

from clip.transform import array_to_tensor, image_transform
from dataprep.geometry import MIN_VISIBLE, Geometry, exif_box, from_one_based, pixel_span
from dataprep.images import ImageReadError, Storage, decode, masked, to_model_input
from tests._raw_data import Obj, draw, jpeg_bytes

SIZES = [(500, 375), (375, 500), (333, 500), (64, 64), (40, 30), (1000, 207), (224, 300)]


def _picture(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "P", "RGBA"])
@pytest.mark.parametrize("resolution", [224, 64])
def test_stored_uint8_and_float_equal_clips_eval_transform(size, mode, resolution):
    image = _picture(size).convert(mode)
    expected = image_transform(resolution)(image)  # clip's eval transform on the raw image
    arr = to_model_input(image, resolution)
    assert arr.dtype == np.uint8 and arr.shape == (resolution, resolution, 3)
    # what training's and evaluation's readers compute from each stored form (docs/data.md, File formats)
    assert torch.equal(array_to_tensor(arr, resolution, is_train=False), expected)
    stored = Storage.from_clip("float32").encode(
        arr
    )  # numpy in the workers: the same bits as torch
    assert stored.dtype == np.float32 and stored.shape == (3, resolution, resolution)
    assert torch.equal(torch.from_numpy(stored), expected)
    assert torch.equal(array_to_tensor(stored, resolution, is_train=False), expected)
    assert Storage.from_clip("uint8").encode(arr) is arr


def test_float_storage_equals_array_to_tensor_for_every_byte_value():
    """The normalisation is per element: checking all 256 values of each channel proves the two paths equal."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    arr = np.stack([values, values.T, values[::-1]], -1)
    assert all(len(np.unique(arr[..., c])) == 256 for c in range(3))
    stored = Storage.from_clip("float32").encode(arr)
    assert torch.equal(torch.from_numpy(stored), array_to_tensor(arr, 16, is_train=False))


@pytest.mark.parametrize("size", SIZES)
def test_a_box_lands_where_its_pixels_land(size):
    w, h = size
    box = (int(w * 0.55), int(h * 0.2), int(w * 0.8), int(h * 0.45))
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), box)
    r = 64
    out = to_model_input(image, r)[..., 0].astype(float)
    g = Geometry(w, h, r)
    x0, y0, x1, y1 = g.map_box(box)
    ys, xs = np.nonzero(out > 127)
    # the bright region's extent matches the mapped box up to the bicubic blur (one output pixel, plus the scale)
    tol = 1.5 + max(r / min(w, h), 1)
    assert abs(xs.min() - max(x0, 0)) <= tol and abs(xs.max() + 1 - min(x1, r)) <= tol
    assert abs(ys.min() - max(y0, 0)) <= tol and abs(ys.max() + 1 - min(y1, r)) <= tol


def test_crop_rule_clips_or_drops():
    g = Geometry(400, 200, 100)  # resized 200x100, crop x in [50, 150) of the resized image
    assert g.resized == (200, 100) and g.offset == (50, 0)
    assert g.crop_box((100, 0, 300, 200)) == (0.0, 0.0, 100.0, 100.0)  # centre: kept whole
    assert g.crop_box((0, 0, 90, 200)) is None  # 0..45 resized: left of the crop
    # half inside: clipped; a quarter of it inside is the limit
    kept = g.crop_box((60, 0, 140, 200))  # 30..70 resized -> -20..20
    assert kept == (0.0, 0.0, 20.0, 100.0)
    # 40 resized pixels wide, 12 (30%) inside the crop: kept; 8 (20%) inside: dropped
    assert MIN_VISIBLE == 0.25
    assert g.crop_box((44, 0, 124, 200)) == (0.0, 0.0, 12.0, 100.0)
    assert g.crop_box((36, 0, 116, 200)) is None


def test_one_based_corners_and_pixel_spans():
    assert from_one_based(1, 1, 10, 20) == (0.0, 0.0, 10.0, 20.0)  # pixels 1..10 -> [0, 10)
    assert pixel_span((2.2, 3.0, 7.5, 9.0)) == (2, 3, 8, 9)
    arr = np.zeros((10, 10, 3), np.uint8)
    m = masked(arr, [(2.2, 3.0, 7.5, 9.0), (8.5, 8.5, 12.0, 11.0)])  # the second is clipped
    fill = (123, 117, 104)
    assert Storage.from_clip("uint8").fill == fill
    filled = np.zeros((10, 10), bool)
    filled[3:9, 2:8] = filled[8:10, 8:10] = True
    assert (m[filled] == fill).all() and (m[~filled] == 0).all() and arr.sum() == 0


def test_storage_constants_are_clips_and_need_no_torch():
    import subprocess
    import sys

    from clip.transform import MEAN, STD

    s = Storage.from_clip("float32")
    assert s.mean == tuple(MEAN) and s.std == tuple(STD)
    code = "import sys, dataprep.pipeline as p; p.Storage.from_clip('uint8'); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_and_boxes_follow(tmp_path, orientation):
    stored = Image.new("RGB", (60, 40), (0, 0, 0))
    box = (5, 8, 20, 30)
    stored.paste((255, 255, 255), box)
    exif = Image.Exif()
    exif[274] = orientation
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes(stored, exif=exif.tobytes()))
    d = decode(path)
    assert d.orientation == orientation and d.stored_size == (60, 40)
    upright = np.asarray(d.image.convert("L")) > 127
    ys, xs = np.nonzero(upright)
    x0, y0, x1, y1 = exif_box(box, orientation, 60, 40)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == pytest.approx(
        (x0, y0, x1, y1), abs=1
    )
    assert d.image.size == ((60, 40) if orientation < 5 else (40, 60))


def test_odd_files_decode_or_fail_with_the_file_name(tmp_path):
    pic = draw((50, 40), [Obj(1, "dog", (5, 5, 20, 20))], 0)
    (tmp_path / "png.jpg").write_bytes(b"")
    pic.save(tmp_path / "png.jpg", "PNG")
    d = decode(tmp_path / "png.jpg")
    assert d.format == "PNG" and d.image.size == (50, 40)
    (tmp_path / "gray.jpg").write_bytes(jpeg_bytes(pic.convert("L")))
    assert decode(tmp_path / "gray.jpg").mode == "L"
    (tmp_path / "cmyk.jpg").write_bytes(jpeg_bytes(pic.convert("CMYK")))
    assert decode(tmp_path / "cmyk.jpg").mode == "CMYK"
    data = jpeg_bytes(pic)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image")
    for name, what in (
        ("cut.jpg", "cannot decode"),
        ("junk.jpg", "not an image"),
        ("none.jpg", "not found"),
    ):
        with pytest.raises(ImageReadError, match=what) as e:
            decode(tmp_path / name)
        assert name in str(e.value)
