"""The lazy npz image archive (agree.images)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from agree.images import ImageArchive
from agree.io import InputError
from clip.transform import image_transform


def test_image_archive_reads_lazily_and_survives_pickling(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pre = rng.standard_normal((3, 64, 64)).astype(np.float32)
    path = tmp_path / "imgs.npz"
    np.savez(path, **{"1007129816": raw, "9": pre, "bad": np.zeros((5, 5))})
    archive = ImageArchive(path)
    assert archive.keys() == ["1007129816", "9", "bad"] and len(archive) == 3
    assert 1007129816 in archive and "nope" not in archive
    clone = pickle.loads(pickle.dumps(archive))
    np.testing.assert_array_equal(clone["1007129816"], raw)
    torch.testing.assert_close(archive.load_tensor(9, 64), torch.from_numpy(pre))
    expected = image_transform(64)(Image.fromarray(raw))
    torch.testing.assert_close(archive.load_tensor("1007129816", 64), expected, atol=1e-5, rtol=0)
    assert archive.load_tensor("1007129816", 32).shape == (3, 32, 32)
    assert archive.load_tensor("1007129816", 64, is_train=True).shape == (3, 64, 64)
    with pytest.raises(InputError, match=r"imgs.npz: no image with key 'nope'"):
        archive["nope"]
    with pytest.raises(InputError, match=r"imgs.npz: image 'bad': unsupported image array"):
        archive.load_tensor("bad", 64)


def test_image_archive_errors(tmp_path):
    with pytest.raises(InputError, match="image archive not found"):
        ImageArchive(tmp_path / "missing.npz")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="broken.npz: not a readable .npz archive"):
        ImageArchive(broken)
