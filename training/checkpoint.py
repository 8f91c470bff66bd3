"""Training checkpoints: atomic writes, RNG state, locating the newest one for --resume latest."""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from agree.io import InputError, atomic_path

LATEST = "epoch_latest.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA random states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so that torch.load(weights_only=True) reads the checkpoint
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    """Restore what rng_state() captured (missing parts are left alone)."""
    if not state:
        return
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state(
            (kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss)
        )
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, ValueError):
            torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside `path`, renamed into place only when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` a copy of the finished checkpoint `src` (a hard link when possible), atomically."""
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            import shutil

            shutil.copyfile(src, tmp)


def find_latest(checkpoint_dir: str | os.PathLike) -> Optional[Path]:
    """epoch_latest.pt if present, else the epoch_N.pt with the largest N, else None."""
    d = Path(checkpoint_dir)
    if (d / LATEST).is_file():
        return d / LATEST
    best: tuple[int, Optional[Path]] = (-1, None)
    if d.is_dir():
        for p in d.iterdir():
            m = _EPOCH_RE.match(p.name)
            if m and int(m.group(1)) > best[0]:
                best = (int(m.group(1)), p)
    return best[1]


def epoch_path(checkpoint_dir: str | os.PathLike, epoch: int) -> Path:
    """checkpoints/epoch_N.pt."""
    return Path(checkpoint_dir) / f"epoch_{epoch}.pt"


def delete_previous(
    checkpoint_dir: str | os.PathLike, epoch: int, save_frequency: int
) -> Optional[Path]:
    """--delete-previous-checkpoint (OpenCLIP's rule): once epoch_N.pt is written, delete
    epoch_{N - save_frequency}.pt if it exists; return what was deleted."""
    previous = epoch - save_frequency
    if save_frequency <= 0 or previous <= 0:
        return None
    path = epoch_path(checkpoint_dir, previous)
    if not path.is_file():
        return None
    path.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a training checkpoint to CPU with torch.load(weights_only=True); errors name the file.

    Only tensors and plain containers are read: a pickle that names any other Python object (a
    function, a class) is refused before anything of it runs. The checkpoints this project writes
    hold nothing else (see rng_state).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--resume: checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file; the unpickler raises many kinds of error
        text = str(e).strip()
        if "Weights only load failed" in text:
            raise InputError(
                f"--resume: {p} holds Python objects other than tensors and plain containers "
                f"({_refused_object(text)}); it is not loaded, because reading them could run "
                "code (torch.load weights_only=True). The checkpoints training/main_all.py writes "
                "hold none: resume from one of those"
            ) from None
        first = text.splitlines()[0] if text else type(e).__name__
        raise InputError(
            f"--resume: cannot read checkpoint {p} ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise InputError(f"--resume: {p} is not a training checkpoint (no 'state_dict')")
    return ckpt


def _refused_object(message: str) -> str:
    """The line of torch's weights-only error that names the refused object (else a generic phrase)."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")
    return "an object the weights-only reader does not accept"


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop a leading 'module.' (checkpoints written from a DDP-wrapped model)."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict
