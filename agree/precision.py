"""Devices and numeric precisions, resolved one way for training, extraction and the benchmarks.

torch is imported where it is used, so that scripts which only need the flag values stay torch-free.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Optional

from agree.io import InputError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("amp", "amp_bf16", "bf16", "fp16", "fp32")
# amp: fp32 weights, fp16 autocast (CUDA only); amp_bf16: fp32 weights, bfloat16 autocast (CPU and CUDA);
# fp16 / bf16: the weights of linear, conv and attention layers in that dtype (fp16 on CUDA only).


def resolve_device(name: Optional[str]) -> torch.device:
    """None/"auto" -> CUDA when available, else the CPU; an unavailable CUDA device is an InputError."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return dev


def resolve_precision(
    requested: Optional[str],
    device: torch.device,
    default_on_cuda: str = "amp",
    flag: str = "--precision",
) -> str:
    """None -> `default_on_cuda` on CUDA, fp32 on the CPU. On the CPU amp runs in fp32; fp16 is an error.

    bf16 and amp_bf16 run on both devices.
    """
    if requested is not None and requested not in PRECISIONS:
        raise InputError(f"{flag}: unknown precision {requested!r}; choose {', '.join(PRECISIONS)}")
    if requested is None:
        return default_on_cuda if device.type == "cuda" else "fp32"
    if device.type != "cuda":
        if requested == "fp16":
            raise InputError(f"{flag} fp16 needs a CUDA device (use fp32 on the CPU)")
        if requested == "amp":
            logging.warning("%s amp has no effect on the CPU; running in fp32", flag)
            return "fp32"
    return requested


def weight_dtype(precision: str) -> torch.dtype:
    """dtype of the model's weights and of the image batches fed to it: fp16 / bf16 for 'fp16' / 'bf16', else fp32."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context: fp16 for 'amp' on CUDA, bfloat16 for 'amp_bf16' on any device, else a no-op."""
    import torch

    if precision == "amp" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if precision == "amp_bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
