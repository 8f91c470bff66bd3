"""Device selection for the eval scripts."""
from __future__ import annotations

import torch

from agree.io import InputError


def resolve_device(name: str | None) -> torch.device:
    """`None`/"auto" -> CUDA when available else CPU; an unavailable CUDA request is an InputError."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return dev
