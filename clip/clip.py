"""Loading CLIP models (OpenAI archives, state dicts, training checkpoints) and tokenising text."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from clip.archive import is_torchscript_archive, read_archive_state_dict
from clip.errors import LoadError
from clip.model import ACTIVATIONS, CLIP, build_model, config_from_state_dict, convert_weights
from clip.simple_tokenizer import SimpleTokenizer
from clip.transform import image_transform

__all__ = [
    "LoadError",
    "available_models",
    "create_model",
    "load",
    "load_checkpoint_state_dict",
    "read_checkpoint",
    "load_model",
    "model_config",
    "model_from_state_dict",
    "normalize_model_name",
    "resolve_checkpoint",
    "tokenize",
]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DEFAULT_DOWNLOAD_ROOT = Path("~/.cache/clip")

# SHA-256 of the checkpoints OpenAI publishes (the digest is part of each download URL).
OPENAI_SHA256 = {
    "RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101.pt": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4.pt": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16.pt": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64.pt": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}

_tokenizer: Optional[SimpleTokenizer] = None


def normalize_model_name(name: str) -> str:
    """'ViT-L/14' -> 'ViT-L-14' (the spelling of config and checkpoint file names)."""
    return name.replace("/", "-")


def available_models() -> list[str]:
    """Names with a config in clip/model_configs (each also accepted with '/' instead of '-')."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict:
    """Constructor arguments of the CLIP config `name` (e.g. 'ViT-B/32', 'ViT-B-32-gelu', 'tiny')."""
    path = CONFIG_DIR / f"{normalize_model_name(name)}.json"
    if not path.is_file():
        raise LoadError(f"unknown model name {name!r}; available: {', '.join(available_models())}")
    config = json.loads(path.read_text())
    if config.get("activation", "quick_gelu") not in ACTIVATIONS:
        raise LoadError(
            f"{path}: unknown activation {config['activation']!r}; choose {', '.join(ACTIVATIONS)}"
        )
    return config


def _cast(model: CLIP, device: Union[str, torch.device], precision: Optional[str]) -> CLIP:
    device = torch.device(device)
    if precision is None:
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "amp", "fp16"):
        raise LoadError(f"unknown precision {precision!r}; choose fp32, amp or fp16")
    model = model.to(device)
    if precision == "fp16":
        convert_weights(model)
    return model


def create_model(
    name: str, device: Union[str, torch.device] = "cpu", precision: Optional[str] = "fp32"
) -> CLIP:
    """A randomly initialised CLIP of config `name` on `device` (fp16 weights if precision='fp16')."""
    return _cast(CLIP(**model_config(name)), device, precision)


def config_name(name_or_path: Union[str, os.PathLike]) -> Optional[str]:
    """`name_or_path` if it is a config name rather than an existing file (e.g. 'ViT-B-32-gelu'), else None."""
    text = str(name_or_path)
    if Path(text).expanduser().is_file() or normalize_model_name(text) not in available_models():
        return None
    return text


def _roots(
    download_root: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]],
) -> list[Path]:
    if download_root is None:
        return [DEFAULT_DOWNLOAD_ROOT.expanduser()]
    if isinstance(download_root, (str, os.PathLike)):
        download_root = [download_root]
    return [Path(r).expanduser() for r in download_root]


def resolve_checkpoint(
    name_or_path: Union[str, os.PathLike],
    download_root: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]] = None,
) -> Path:
    """The checkpoint file of a path, or of a model name looked up as `<name>.pt` in `download_root`.

    `download_root` is a folder or a list of folders searched in order (default ~/.cache/clip).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    stem = normalize_model_name(text)
    if stem in available_models() or f"{stem}.pt" in OPENAI_SHA256:
        candidates = [root / f"{stem}.pt" for root in _roots(download_root)]
        for c in candidates:
            if c.is_file():
                return c
        raise LoadError(
            f"no checkpoint for model {text!r}: looked for {', '.join(str(c) for c in dict.fromkeys(candidates))}. "
            f"Put OpenAI's {stem}.pt in one of those folders, or pass the checkpoint's path."
        )
    looks_like_path = (
        text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix != ""
    )
    if looks_like_path:
        raise LoadError(f"checkpoint file not found: {path}")
    raise LoadError(
        f"unknown model name {text!r}; available: {', '.join(available_models())}, "
        "or a path to a checkpoint file"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_openai_checkpoint(path: Path) -> None:
    """If `path` is named like an OpenAI checkpoint, check its SHA-256 against OpenAI's digest."""
    expected = OPENAI_SHA256.get(path.name)
    if expected is not None and _sha256(path) != expected:
        raise LoadError(
            f"{path}: SHA-256 does not match OpenAI's published {path.name} (corrupt or partial "
            "download?). Download it again, rename the file if it is your own checkpoint, or load "
            "it with verify=False."
        )


def _jit_state_dict(path: Path) -> dict:
    """State dict of a TorchScript archive through torch.jit.load (runs the archive's code: jit=True only)."""
    try:
        return dict(_jit_load(path).state_dict())
    except RuntimeError as e:
        raise LoadError(
            f"{path}: torch.jit.load failed: {str(e).strip().splitlines()[0]}"
        ) from None


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    return torch.jit.load(str(path), map_location="cpu").eval()


def _read_weights(path: Path, jit: bool) -> dict:
    """The dict a checkpoint file holds: an archive's state dict, or what torch.load(weights_only=True) gives."""
    if is_torchscript_archive(path):
        return _jit_state_dict(path) if jit else read_archive_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler raises many kinds of error on damaged files
        if "Weights only load failed" in str(e):
            raise LoadError(
                f"{path}: holds Python objects other than tensors, which are not loaded for safety "
                "(torch.load weights_only=True); save the model's state dict alone"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"{path}: not a TorchScript archive or a PyTorch checkpoint "
            f"(truncated or corrupt file?): {first}"
        ) from None
    if not isinstance(obj, dict):
        raise LoadError(
            f"{path}: expected a state dict or a training checkpoint, got {type(obj).__name__}"
        )
    return obj


def load_checkpoint_state_dict(path: Union[str, os.PathLike], jit: bool = False) -> dict:
    """State dict from a TorchScript archive, a plain state dict, or a training checkpoint ('module.' stripped).

    An archive (e.g. OpenAI's) is read without running its code (clip.archive); ``jit=True`` reads it
    with torch.jit.load instead, which runs the archive's TorchScript code.
    """
    return read_checkpoint(path, jit)[0]


def read_checkpoint(path: Union[str, os.PathLike], jit: bool = False) -> tuple[dict, Optional[str]]:
    """(state dict, the model config name a training checkpoint records under "model", or None); see
    load_checkpoint_state_dict."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"checkpoint file not found: {path}")
    obj = _read_weights(path, jit)
    state_dict = obj.get("state_dict", obj)
    if not isinstance(state_dict, dict) or not state_dict:
        raise LoadError(
            f"{path}: no model weights found (expected a state dict or {{'state_dict': ...}})"
        )
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    bad = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if bad:
        raise LoadError(f"{path}: entry {bad[0]!r} of the state dict is not a tensor")
    name = obj.get("model") if "state_dict" in obj else None
    return state_dict, name if isinstance(name, str) else None


def load_state_dict_into(
    model: nn.Module, state_dict: dict, source: Union[str, os.PathLike]
) -> None:
    """Strictly load `state_dict` into `model`; a mismatch is an LoadError naming `source`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0]
        raise LoadError(f"{source}: weights do not fit the model: {detail}") from None


def _inferred_config(state_dict: dict, source: Union[str, os.PathLike]) -> dict:
    try:
        return config_from_state_dict(state_dict)
    except KeyError as e:
        raise LoadError(f"{source}: not a CLIP state dict (missing {e.args[0]!r})") from None


def model_from_state_dict(
    state_dict: dict, source: Union[str, os.PathLike], model_name: Optional[str] = None
) -> CLIP:
    """A CLIP holding `state_dict` (fp32, eval mode); errors name `source`.

    Without `model_name` the architecture is inferred from the weights and the activation is QuickGELU
    (OpenAI's). With it, the named config is built (its activation included: a state dict cannot tell
    QuickGELU from GELU) after checking that the weights have its architecture.
    """
    config = None
    if model_name is not None:
        config = model_config(model_name)
        inferred = _inferred_config(state_dict, source)
        diff = [k for k, v in inferred.items() if k != "transformer_heads" and v != config[k]]
        if diff:
            found = ", ".join(f"{k} {inferred[k]} != {config[k]}" for k in diff[:3])
            raise LoadError(
                f"{source}: weights are not a {normalize_model_name(model_name)} model ({found}); "
                "check the model name"
            )
    else:
        _inferred_config(state_dict, source)
    try:
        return build_model(state_dict, config)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise LoadError(
            f"{source}: inconsistent CLIP state dict: {'; '.join(lines[1:3]) or lines[0]}"
        ) from None


def load_model(
    path: Union[str, os.PathLike],
    model_name: Optional[str] = None,
    jit: bool = False,
    device: Union[str, torch.device] = "cpu",
    precision: Optional[str] = "fp32",
    is_train: bool = False,
) -> CLIP:
    """Our CLIP from a checkpoint file (no name lookup, no checksum; see load).

    ``model_name``: see model_from_state_dict. ``jit=True`` reads a TorchScript archive's weights with
    torch.jit.load (which runs the archive's code) instead of the restricted reader.
    """
    model = _cast(
        model_from_state_dict(load_checkpoint_state_dict(path, jit=jit), path, model_name),
        device,
        precision,
    )
    return model.train(is_train)


def load(
    name: Union[str, os.PathLike],
    device: Union[str, torch.device, None] = None,
    jit: bool = False,
    is_train: bool = False,
    precision: Optional[str] = None,
    verify: bool = True,
    download_root: Union[None, str, os.PathLike, Sequence[Union[str, os.PathLike]]] = None,
    model_name: Optional[str] = None,
):
    """Load a CLIP model by name or path -> (model, train_transform, eval_transform).

    Accepts a TorchScript archive (OpenAI's checkpoints), a plain state dict, or a training checkpoint
    ``{"epoch", "state_dict", ...}`` (``module.`` prefixes stripped). Archives are read without running
    their code. The architecture is inferred from the weights, with QuickGELU activations (OpenAI's);
    ``model_name`` (e.g. 'ViT-B-32-gelu' for an OpenCLIP GELU checkpoint; default: ``name`` when it is a
    config name) builds that config instead, after checking the weights fit it. ``device`` None means
    CUDA when available, else the CPU. ``precision`` None gives fp16 weights on CUDA and fp32 on CPU
    (OpenAI's behaviour); 'fp32' or 'amp' give fp32 weights, 'fp16' half weights.
    ``jit=True`` returns the TorchScript module stored in the archive, through torch.jit.load (which
    runs the archive's code and is deprecated in recent torch).
    A name is looked up in ``download_root`` (see resolve_checkpoint); a file named like one of
    OpenAI's checkpoints is checked against its SHA-256 unless ``verify=False``.
    The model is in eval mode unless ``is_train``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_checkpoint(name, download_root)
    if model_name is None:
        model_name = config_name(name)
    if verify:
        verify_openai_checkpoint(path)
    if jit:
        if not is_torchscript_archive(path):
            raise LoadError(
                f"{path}: jit=True needs a TorchScript archive; this file is a state dict"
            )
        model = _jit_load(path)
        resolution = config_from_state_dict(model.state_dict())["image_resolution"]
        model = model.to(device).train(is_train)
    else:
        model = load_model(path, model_name, device=device, precision=precision, is_train=is_train)
        resolution = model.visual.input_resolution
    return (
        model,
        image_transform(resolution, is_train=True),
        image_transform(resolution, is_train=False),
    )


def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer instance (built on first use)."""
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    return _tokenizer


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = True
) -> torch.LongTensor:
    """Token ids, (N, context_length), with start/end tokens and zero padding.

    A text longer than the context is cut to ``context_length`` tokens with the end token kept
    last (``truncate=False`` raises instead).
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_token, *tok.encode(text), tok.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"input {text!r} is too long for context length {context_length}")
            ids = ids[:context_length]
            ids[-1] = tok.eot_token
        result[i, : len(ids)] = torch.tensor(ids)
    return result
