"""clip.load on every accepted checkpoint form and its errors; the project's checkpoint folders (agree.pretrained)."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from agree.io import InputError
from agree.pretrained import load_pretrained, resolve_pretrained
from clip.clip import (
    LoadError,
    create_model,
    load,
    load_checkpoint_state_dict,
    resolve_checkpoint,
    tokenize,
)
from clip.transform import array_to_tensor


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
    with warnings.catch_warnings():  # torch >= 2.9 deprecates torch.jit
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(tiny, batch, check_trace=False), str(path))
    model, train_tf, eval_tf = load(
        path, device="cpu"
    )  # read without torch.jit.load (test_clip_archive.py)
    _assert_same(_outputs(model, batch), _outputs(tiny, batch))
    assert not model.training
    assert eval_tf(Image.new("RGB", (80, 100))).shape == (3, 64, 64)
    assert train_tf(Image.new("RGB", (80, 100))).shape == (3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted, _, _ = load(path, device="cpu", jit=True)
    assert isinstance(scripted, torch.jit.ScriptModule)
    _assert_same(_outputs(scripted, batch), _outputs(tiny, batch))
    torch.save(tiny.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(LoadError, match="jit=True needs a TorchScript archive"):
        load(tmp_path / "plain.pt", device="cpu", jit=True)


def test_plain_state_dict_and_training_checkpoint(tmp_path, tiny, batch):
    plain = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), plain)
    _assert_same(_outputs(load(plain, device="cpu")[0], batch), _outputs(tiny, batch))

    ckpt = tmp_path / "epoch_2.pt"
    wrapped = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    torch.save(
        {
            "epoch": 2,
            "name": "run",
            "state_dict": wrapped,
            "optimizer": {"state": {}, "param_groups": []},
        },
        ckpt,
    )
    _assert_same(_outputs(load(ckpt, device="cpu")[0], batch), _outputs(tiny, batch))
    assert set(load_checkpoint_state_dict(ckpt)) == set(tiny.state_dict())


def test_precision_and_train_mode(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    model, _, _ = load(path, device="cpu", precision="fp16", is_train=True)
    assert model.dtype == torch.float16 and model.training
    assert load(path, device="cpu")[0].dtype == torch.float32  # CPU default: fp32


def test_names_resolve_in_download_roots(tmp_path, tiny):
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    torch.save(tiny.state_dict(), second / "tiny.pt")
    assert resolve_checkpoint("tiny", [first, second]) == second / "tiny.pt"
    load("tiny", device="cpu", download_root=second)
    with pytest.raises(LoadError, match=r"no checkpoint for model 'tiny': looked for .*a/tiny\.pt"):
        resolve_checkpoint("tiny", first)


def test_project_names_resolve_to_pretrained_folder(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp/pretrained_models").mkdir(parents=True)
    torch.save(tiny.state_dict(), tmp_path / "tmp/pretrained_models/tiny.pt")
    assert (
        resolve_pretrained("tiny").resolve()
        == (tmp_path / "tmp/pretrained_models/tiny.pt").resolve()
    )
    load_pretrained("tiny", device="cpu")


def test_missing_named_checkpoint_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InputError, match=r"ViT-L/14.*tmp/pretrained_models.*ViT-L-14\.pt.*README"):
        load_pretrained("ViT-L/14", device="cpu")


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(LoadError, match="unknown model name 'ViT-Z/99'.*tiny"):
        load("ViT-Z/99", device="cpu")
    with pytest.raises(LoadError, match="not found: .*nope.pt"):
        load(tmp_path / "nope.pt", device="cpu")


def test_corrupt_and_truncated_files(tmp_path, tiny):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(
        LoadError, match="junk.pt: not a TorchScript archive or a PyTorch checkpoint"
    ):
        load(junk, device="cpu")
    good = tmp_path / "good.pt"
    torch.save(tiny.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoadError, match="cut.pt"):
        load(cut, device="cpu")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "obj": Image.new("RGB", (1, 1))}, f)
    with pytest.raises(LoadError, match="evil.pt: holds Python objects other than tensors"):
        load(path, device="cpu")


def test_wrong_shapes_and_non_clip_dicts(tmp_path, tiny):
    sd = dict(tiny.state_dict())
    sd["visual.proj"] = torch.zeros(7, 7)
    bad = tmp_path / "bad_shapes.pt"
    torch.save(sd, bad)
    with pytest.raises(LoadError, match="bad_shapes.pt: inconsistent CLIP state dict"):
        load(bad, device="cpu")
    other = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(LoadError, match="resnet.pt: not a CLIP state dict"):
        load(other, device="cpu")


def test_sha256_checked_for_openai_file_names(tmp_path, tiny, monkeypatch):
    fake = tmp_path / "ViT-B-32.pt"
    torch.save(tiny.state_dict(), fake)
    with pytest.raises(LoadError, match="SHA-256 does not match OpenAI's published ViT-B-32.pt"):
        load(fake, device="cpu")
    load(fake, device="cpu", verify=False)
    with pytest.raises(InputError, match="SHA-256 does not match .*AGREE_SKIP_CHECKSUM=1"):
        load_pretrained(fake, device="cpu")
    monkeypatch.setenv("AGREE_SKIP_CHECKSUM", "1")
    load_pretrained(fake, device="cpu")


def test_float_arrays_of_other_sizes_are_resized():
    arr = np.ones((3, 224, 224), dtype=np.float32)
    out = array_to_tensor(arr, 64)
    assert out.shape == (3, 64, 64)
    torch.testing.assert_close(out, torch.ones(3, 64, 64), atol=1e-4, rtol=0)
