"""TorchScript archives read without running their code (clip.archive): archives the tests write themselves
(traced CLIPs, an OpenAI-style fp16 archive, a scripted module with every kind of attribute, a scripted
OpenCLIP model), and crafted archives whose pickle tries to run something."""

import pickle
import struct
import warnings
import zipfile
from typing import Optional

import pytest
import torch
from torch import nn

from agree.io import InputError
from agree.pretrained import load_pretrained
from clip.archive import is_torchscript_archive, read_archive_state_dict
from clip.clip import (
    LoadError,
    create_model,
    load,
    load_checkpoint_state_dict,
    model_config,
    tokenize,
)
from clip.model import CLIP, build_model, config_from_state_dict, convert_weights


def _quiet(fn, *args, **kwargs):
    """Call a torch.jit function without its deprecation warnings (torch >= 2.9)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=g), tokenize(["a red circle", "two blue stars"])


def _outputs(model, batch):
    with torch.no_grad():
        return model(*batch)


def _assert_same_tensors(got: dict, want: dict):
    assert list(got) == list(want)
    for k, v in want.items():
        assert (
            got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].stride() == v.stride()
        ), k
        assert torch.equal(got[k], v), k


def _jit_state_dict(path):
    return dict(_quiet(torch.jit.load, str(path)).state_dict())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def traced_archive(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("archives") / "traced.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.trace, tiny, _batch(), check_trace=False), str(path))
    return path


def _no_jit_load(*args, **kwargs):
    raise AssertionError("torch.jit.load was called")


def test_traced_clip_weights_read_without_torch_jit_load(traced_archive, tiny, monkeypatch):
    reference = _jit_state_dict(traced_archive)  # what the archive's own loader gives
    monkeypatch.setattr(torch.jit, "load", _no_jit_load)
    assert is_torchscript_archive(traced_archive)
    weights = read_archive_state_dict(traced_archive)
    _assert_same_tensors(weights, reference)
    # TorchScript keeps the non-persistent causal mask as a buffer; the rest is the model's state dict
    _assert_same_tensors({k: v for k, v in weights.items() if k != "attn_mask"}, tiny.state_dict())
    model, _, eval_tf = load(traced_archive, device="cpu")
    assert isinstance(model, CLIP) and not model.training
    batch = _batch()
    for a, b in zip(_outputs(model, batch), _outputs(tiny, batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_jit_option_reads_the_same_weights(traced_archive):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_jit = load_checkpoint_state_dict(traced_archive, jit=True)
        scripted, _, _ = load(traced_archive, device="cpu", jit=True)
        ours, _, _ = load_pretrained(traced_archive, device="cpu", jit=True)
    _assert_same_tensors(load_checkpoint_state_dict(traced_archive), by_jit)
    assert isinstance(scripted, torch.jit.ScriptModule)
    assert isinstance(ours, CLIP)  # the scripts' --jit: torch.jit.load reads, our CLIP runs
    batch = _batch()
    for a, b in zip(_outputs(ours, batch), _outputs(scripted, batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class _OpenAIStyle(CLIP):
    """Our CLIP laid out like OpenAI's archives: int64 scalar buffers beside the weights, fp16 weights."""

    def __init__(self, **config):
        super().__init__(**config)
        self.register_buffer("input_resolution", torch.tensor(self.visual.input_resolution))
        for name in ("context_length", "vocab_size"):  # our model keeps these as ints
            value = getattr(self, name)
            delattr(self, name)
            self.register_buffer(name, torch.tensor(value))


def test_openai_style_fp16_archive(tmp_path):
    torch.manual_seed(1)
    openai_like = _OpenAIStyle(**model_config("tiny")).eval()
    convert_weights(openai_like)
    path = tmp_path / "ViT-tiny.pt"
    _quiet(
        torch.jit.save, _quiet(torch.jit.trace, openai_like, _batch(), check_trace=False), str(path)
    )
    weights = read_archive_state_dict(path)
    _assert_same_tensors(weights, _jit_state_dict(path))
    assert (
        weights["visual.proj"].dtype == torch.float16 and weights["input_resolution"].item() == 64
    )
    model, _, _ = load(path, device="cpu")  # OpenAI's scalar entries dropped, fp32 weights
    assert model.dtype == torch.float32
    reference = create_model("tiny").eval()
    reference.load_state_dict(
        {
            k: v.float()
            for k, v in openai_like.state_dict().items()
            if k not in ("input_resolution", "context_length", "vocab_size")
        }
    )
    batch = _batch()
    for a, b in zip(_outputs(model, batch), _outputs(reference, batch)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)  # bias None: not an entry
        self.scale = nn.Parameter(torch.randn(4).half())
        self.register_buffer("steps", torch.arange(5))  # int64 buffer
        self.register_buffer("scratch", torch.ones(2), persistent=False)
        base = torch.randn(4, 6)
        self.register_buffer("t", base.t())  # non-contiguous view
        self.register_buffer("tail", base.flatten()[5:17])  # shares base's storage at an offset
        self.plain = torch.full((2,), 7.0)  # plain tensor attribute: not state
        self.sizes: list[int] = [1, 2, 3]
        self.names: dict[str, int] = {"a": 1}
        self.mode = "x"

    def forward(self, x):
        return self.lin(x) + self.plain.sum() + len(self.sizes) + self.names["a"]


class _Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Leaf(), _Leaf()])
        self.seq = nn.Sequential(nn.Linear(2, 2), nn.GELU(), nn.LayerNorm(2))
        self.missing: Optional[nn.Module] = None
        self.flag = torch.tensor(True)  # plain tensor attribute

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.seq(x)


def test_scripted_module_with_every_kind_of_attribute(tmp_path):
    torch.manual_seed(0)
    module = _Tree()
    path = tmp_path / "tree.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.script, module), str(path))
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)
    weights = read_archive_state_dict(path)
    _assert_same_tensors(weights, _jit_state_dict(path))
    # plain tensor attributes are not state; a missing bias is no entry
    assert {"blocks.0.plain", "flag", "blocks.0.lin.bias"}.isdisjoint(weights)
    assert (
        weights["blocks.1.t"].stride() == (1, 6) and weights["blocks.1.tail"].storage_offset() == 5
    )


def _rewrite(src, dst, replace: dict):
    """Copy the archive `src` to `dst` with some entries' bytes replaced (None: left out) or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        names = zin.namelist()
        for name in names + [n for n in replace if n not in names]:
            data = replace[name] if name in replace else zin.read(name)
            if data is not None:
                zout.writestr(name, data)


def _entry(archive, suffix):
    return next(n for n in zipfile.ZipFile(archive).namelist() if n.endswith(suffix))


def _calls(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle that calls module.name(*args) (strings only) when unpickled."""
    out = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n("
    for a in args:
        out += b"X" + len(a.encode()).to_bytes(4, "little") + a.encode()
    return out + b"tR."


def test_archive_whose_pickle_calls_os_system_is_refused(traced_archive, tmp_path):
    marker = tmp_path / "ran"
    payload = _calls("os", "system", f"touch {marker}")
    pickle.loads(payload)  # the payload is real: unpickled by plain pickle it runs
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.pt"
    _rewrite(traced_archive, evil, {_entry(traced_archive, "/data.pkl"): payload})
    assert is_torchscript_archive(evil)
    with pytest.raises(
        LoadError, match=r"evil\.pt: traced/data\.pkl calls os\.system; .*nothing was run.*jit=True"
    ):
        load(evil, device="cpu")
    with pytest.raises(InputError, match=r"evil\.pt: traced/data\.pkl calls os\.system"):
        load_pretrained(evil, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "module,name",
    [
        ("builtins", "exec"),
        ("subprocess", "Popen"),
        ("torch", "load"),
        ("torch.jit._pickle", "build_tensor_from_id"),
        ("__builtin__", "eval"),
    ],
)
def test_payload_inside_a_module_record_is_refused(traced_archive, tmp_path, module, name):
    """A call hidden among real module records: the unpickler stops at the global, before any call."""
    marker = tmp_path / "ran"
    call = _calls(module, name, f"open({str(marker)!r}, 'w')")[
        2:-1
    ]  # the call without header / STOP
    record = b"\x80\x02c__torch__.clip.model\nCLIP\n)\x81}(X\x04\x00\x00\x00evil" + call + b"ub."
    evil = tmp_path / "hidden.pt"
    _rewrite(traced_archive, evil, {_entry(traced_archive, "/data.pkl"): record})
    with pytest.raises(LoadError, match=rf"hidden\.pt: traced/data\.pkl calls {module}\.{name}; "):
        load_checkpoint_state_dict(evil)
    assert not marker.exists()


def test_damaged_archives(traced_archive, tmp_path):
    storage = _entry(traced_archive, "/data/3")
    missing = tmp_path / "missing.pt"
    _rewrite(traced_archive, missing, {storage: None})
    with pytest.raises(LoadError, match=r"missing\.pt: the archive has no traced/data/3"):
        load(missing, device="cpu")
    short = tmp_path / "short.pt"
    _rewrite(traced_archive, short, {storage: b"\x00" * 8})
    with pytest.raises(LoadError, match=r"short\.pt: traced/data/3 holds 8 bytes"):
        load(short, device="cpu")
    flipped = (
        tmp_path / "flipped.pt"
    )  # one byte of a storage changed in place: the entry's CRC catches it
    raw = bytearray(traced_archive.read_bytes())
    info = zipfile.ZipFile(traced_archive).getinfo(storage)
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    raw[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    flipped.write_bytes(raw)
    with pytest.raises(LoadError, match=r"flipped\.pt: traced/data/3: CRC mismatch"):
        load(flipped, device="cpu")
    nocode = tmp_path / "nocode.pt"
    _rewrite(
        traced_archive,
        nocode,
        {n: None for n in zipfile.ZipFile(traced_archive).namelist() if "/code/" in n},
    )
    with pytest.raises(LoadError, match=r"nocode\.pt: .*traced/code/__torch__/clip/model\.py"):
        load(nocode, device="cpu")
    custom = tmp_path / "custom.pt"  # an object whose state is not a dict (a custom __getstate__)
    _rewrite(
        traced_archive,
        custom,
        {_entry(traced_archive, "/data.pkl"): b"\x80\x02c__torch__.clip.model\nCLIP\n)\x81K\x01b."},
    )
    with pytest.raises(LoadError, match=r"custom\.pt: .*CLIP stores its state in a custom form"):
        load(custom, device="cpu")
    big = tmp_path / "big_endian.pt"
    _rewrite(traced_archive, big, {"traced/byteorder": b"big"})
    with pytest.raises(LoadError, match=r"big_endian\.pt: a big-endian archive"):
        load(big, device="cpu")
    garbage = tmp_path / "garbage.pt"
    _rewrite(traced_archive, garbage, {_entry(traced_archive, "/data.pkl"): b"\x80\x02garbage"})
    with pytest.raises(LoadError, match=r"garbage\.pt: damaged TorchScript archive"):
        load(garbage, device="cpu")


def test_scripted_openclip_model_archive(tmp_path):
    """A scripted OpenCLIP model (GELU, random weights): its archive loads into our CLIP with the same outputs."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    peer = open_clip.CLIP(
        embed_dim=32,
        quick_gelu=False,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
    ).eval()
    path = tmp_path / "openclip_scripted.pt"
    _quiet(torch.jit.save, _quiet(torch.jit.script, peer), str(path))
    weights = read_archive_state_dict(path)
    _assert_same_tensors(weights, _jit_state_dict(path))
    ours = build_model(weights, {**config_from_state_dict(weights), "activation": "gelu"})
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tokenize(["a photo of a dog", "two red circles"])
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode_image(images), peer.encode_image(images), rtol=0, atol=1e-5
        )
        torch.testing.assert_close(
            ours.encode_text(tokens), peer.encode_text(tokens), rtol=0, atol=1e-5
        )


def test_state_dict_files_are_not_archives(tiny, tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    assert not is_torchscript_archive(path)
    assert not is_torchscript_archive(tmp_path / "absent.pt")
    with pytest.raises(LoadError, match="plain.pt: not a TorchScript archive"):
        read_archive_state_dict(path)
