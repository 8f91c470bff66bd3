"""Where the project keeps pre-trained CLIP checkpoints, and loading them by model name or path."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

import clip.clip as clip_api
from agree.io import InputError
from clip.transform import image_transform

PRETRAINED_DIR = Path(
    "tmp/pretrained_models"
)  # relative to the working directory, as in the README
REPO_PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "tmp" / "pretrained_models"
SEARCH_DIRS = (PRETRAINED_DIR, REPO_PRETRAINED_DIR, Path("~/.cache/clip"))
SKIP_CHECKSUM_ENV = "AGREE_SKIP_CHECKSUM"  # =1: load a re-saved copy of an OpenAI-named checkpoint


@contextlib.contextmanager
def clip_errors_as_input_errors() -> Iterator[None]:
    """Report clip's LoadError (a bad model name, checkpoint or state dict) as the project's InputError."""
    try:
        yield
    except clip_api.LoadError as e:
        message = str(e)
        if "SHA-256" in message:
            message += f" Set {SKIP_CHECKSUM_ENV}=1 to load it anyway."
        raise InputError(message) from None


def verify_checksums() -> bool:
    """False when AGREE_SKIP_CHECKSUM=1 is set (e.g. for a mirror's re-saved ViT-L-14.pt)."""
    return os.environ.get(SKIP_CHECKSUM_ENV) != "1"


def default_checkpoint(model_name: str) -> Path:
    """tmp/pretrained_models/<model, '/' -> '-'>.pt, where the README's download puts it."""
    return PRETRAINED_DIR / f"{clip_api.normalize_model_name(model_name)}.pt"


def resolve_pretrained(name_or_path: Union[str, os.PathLike]) -> Path:
    """A checkpoint path, or a model name looked up in tmp/pretrained_models/, then ~/.cache/clip."""
    try:
        return clip_api.resolve_checkpoint(name_or_path, SEARCH_DIRS)
    except clip_api.LoadError as e:
        raise InputError(
            f"{e} (the README's 'Model preparation' command downloads ViT-L-14.pt to "
            f"{PRETRAINED_DIR}/)"
        ) from None


def load_pretrained(
    name_or_path: Union[str, os.PathLike],
    device: Union[str, torch.device] = "cpu",
    precision: Optional[str] = "fp32",
    is_train: bool = False,
    jit: bool = False,
    model_name: Optional[str] = None,
):
    """Our CLIP from a checkpoint, with the project's search folders and checksum setting -> (model, train_tf, eval_tf).

    `model_name` (e.g. ViT-B-32-gelu; default: `name_or_path` when it is a config name) builds that config,
    its activation included, after checking that the weights fit it; without it the architecture is
    inferred, with OpenAI's QuickGELU. `jit=True` reads a
    TorchScript archive with torch.jit.load (runs the archive's code) instead of the restricted reader.
    """
    path = resolve_pretrained(name_or_path)
    if model_name is None:
        model_name = clip_api.config_name(name_or_path)
    with clip_errors_as_input_errors():
        if verify_checksums():
            clip_api.verify_openai_checkpoint(path)
        model = clip_api.load_model(
            path, model_name, jit=jit, device=device, precision=precision, is_train=is_train
        )
    resolution = model.visual.input_resolution
    return (
        model,
        image_transform(resolution, is_train=True),
        image_transform(resolution, is_train=False),
    )
