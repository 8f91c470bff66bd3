"""clip.load on every accepted checkpoint form, its errors, and the npz image archive."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from agree.io import InputError
from clip.clip import create_model, load, load_checkpoint_state_dict, resolve_checkpoint, tokenize
from clip.image_archive import ImageArchive
from clip.transform import array_to_tensor, image_transform


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g), tokenize(["a red circle", "two blue stars"])


def _outputs(model, batch):
    with torch.no_grad():
        img, txt, scale = model(*batch)
    return img, txt, scale


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_torchscript_archive_round_trip(tmp_path, tiny, batch):
    path = tmp_path / "archive.pt"
    torch.jit.save(torch.jit.trace(tiny, batch, check_trace=False), str(path))
    model, train_tf, eval_tf = load(path, device="cpu")
    _assert_same(_outputs(model, batch), _outputs(tiny, batch))
    assert not model.training
    assert eval_tf(Image.new("RGB", (80, 100))).shape == (3, 64, 64)
    assert train_tf(Image.new("RGB", (80, 100))).shape == (3, 64, 64)
    scripted, _, _ = load(path, device="cpu", jit=True)
    assert isinstance(scripted, torch.jit.ScriptModule)
    _assert_same(_outputs(scripted, batch), _outputs(tiny, batch))


def test_plain_state_dict_and_training_checkpoint(tmp_path, tiny, batch):
    plain = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), plain)
    _assert_same(_outputs(load(plain, device="cpu")[0], batch), _outputs(tiny, batch))

    ckpt = tmp_path / "epoch_2.pt"
    wrapped = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"epoch": 2, "name": "run", "state_dict": wrapped, "optimizer": {"state": {}, "param_groups": []}}, ckpt)
    _assert_same(_outputs(load(ckpt, device="cpu")[0], batch), _outputs(tiny, batch))
    assert set(load_checkpoint_state_dict(ckpt)) == set(tiny.state_dict())


def test_precision_and_train_mode(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    model, _, _ = load(path, device="cpu", precision="fp16", is_train=True)
    assert model.dtype == torch.float16 and model.training
    assert load(path, device="cpu")[0].dtype == torch.float32  # CPU default: fp32


def test_names_resolve_to_pretrained_folder(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp/pretrained_models").mkdir(parents=True)
    torch.save(tiny.state_dict(), tmp_path / "tmp/pretrained_models/tiny.pt")
    assert resolve_checkpoint("tiny").resolve() == (tmp_path / "tmp/pretrained_models/tiny.pt").resolve()
    load("tiny", device="cpu")


def test_missing_named_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputError, match=r"ViT-L/14.*tmp/pretrained_models.*ViT-L-14\.pt.*README"):
        load("ViT-L/14", device="cpu")


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(InputError, match="unknown model name 'ViT-Z/99'.*tiny"):
        load("ViT-Z/99", device="cpu")
    with pytest.raises(InputError, match="not found: .*nope.pt"):
        load(tmp_path / "nope.pt", device="cpu")


def test_corrupt_and_truncated_files(tmp_path, tiny):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(InputError, match="junk.pt: not a TorchScript archive or a PyTorch checkpoint"):
        load(junk, device="cpu")
    good = tmp_path / "good.pt"
    torch.save(tiny.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.pt"):
        load(cut, device="cpu")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "obj": Image.new("RGB", (1, 1))}, f)
    with pytest.raises(InputError, match="evil.pt: holds Python objects other than tensors"):
        load(path, device="cpu")


def test_wrong_shapes_and_non_clip_dicts(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    sd["visual.proj"] = torch.zeros(7, 7)
    bad = tmp_path / "bad_shapes.pt"
    torch.save(sd, bad)
    with pytest.raises(InputError, match="bad_shapes.pt: inconsistent CLIP state dict"):
        load(bad, device="cpu")
    other = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(InputError, match="resnet.pt: not a CLIP state dict"):
        load(other, device="cpu")


def test_sha256_checked_for_openai_file_names(tmp_path, tiny, monkeypatch):
    fake = tmp_path / "ViT-B-32.pt"
    torch.save(tiny.state_dict(), fake)
    with pytest.raises(InputError, match="SHA-256 does not match OpenAI's published ViT-B-32.pt.*AGREE_SKIP_CHECKSUM"):
        load(fake, device="cpu")
    load(fake, device="cpu", verify=False)
    monkeypatch.setenv("AGREE_SKIP_CHECKSUM", "1")
    load(fake, device="cpu")


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


def test_float_arrays_of_other_sizes_are_resized():
    arr = np.ones((3, 224, 224), dtype=np.float32)
    out = array_to_tensor(arr, 64)
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out, torch.ones(3, 64, 64), atol=1e-4, rtol=0)
