"""Fine-tuning's image path: a stored array -> the (3, R, R) tensor a batch holds, with the augmentation of
--augment, the same for every storage.

Every stored image is first brought to CLIP-normalised float32 (3, R', R') (agree.pixels.normalised:
uint8 through the exact table of the float32 archives, float as stored, nothing undone); masks and
the masked-square fallback are filled there; then the geometric step runs on that tensor:

* `none` (the release's recipe): the tensor as is (resized to R x R, bicubic, only if R' != R);
* `random-resized-crop`: torchvision's RandomResizedCrop(R, scale=(0.9, 1.0), ratio=(3/4, 4/3)) window
  (the crop OpenCLIP's training transform uses by default), drawn from a generator seeded per example and
  slot, then resized to R x R (bicubic with PIL's kernel: torch's antialiased bicubic) and clamped to the
  normalised range of bytes 0-255, as a uint8 resize is.

So the uint8 and the float32 storage of the same images give bit-identical batches, with or without
augmentation (tests/test_train_storage.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from agree.pixels import normalised_range

NONE, RANDOM_RESIZED_CROP = "none", "random-resized-crop"
AUGMENTATIONS = (NONE, RANDOM_RESIZED_CROP)
SCALE = (0.9, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
_LOW, _HIGH = (torch.from_numpy(v).view(3, 1, 1) for v in normalised_range())


def crop_window(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop window: torchvision's get_params, drawn from `generator`."""
    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(SCALE[0], SCALE[1], generator=generator).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed ratio
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """(3, h, w) -> (3, R, R): bicubic with PIL's kernel, clamped to the normalised byte range."""
    if x.shape[1:] == (resolution, resolution):
        return x
    out = torch.nn.functional.interpolate(
        x[None], size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False
    )[0]
    return torch.maximum(torch.minimum(out, _HIGH), _LOW)


def to_batch_tensor(x: np.ndarray, resolution: int, augment: str, seed: int) -> torch.Tensor:
    """A CLIP-normalised float32 (3, R', R') array -> the (3, R, R) tensor of a batch (see the module doc)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if augment == RANDOM_RESIZED_CROP:
        top, left, h, w = crop_window(t.shape[1], t.shape[2], torch.Generator().manual_seed(seed))
        return resize(t[:, top : top + h, left : left + w], resolution)
    if augment != NONE:
        raise ValueError(
            f"unknown augmentation {augment!r} (choose from {', '.join(AUGMENTATIONS)})"
        )
    return resize(t, resolution)
