"""CLIP image preprocessing for PIL images and for the arrays stored in `.npz` archives."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class ImageTransform:
    """PIL image -> normalised (3, R, R) tensor; train: RandomResizedCrop(scale 0.9-1), eval: Resize + CenterCrop.

    The torchvision pipeline is built on first use: importing torchvision costs ~2 s, which
    scripts that only read preprocessed or right-sized arrays never need to pay.
    """

    def __init__(self, resolution: int, is_train: bool = False):
        self.resolution, self.is_train = resolution, is_train
        self._pipeline: Optional[Callable] = None

    def _build(self) -> Callable:
        from torchvision.transforms import (
            CenterCrop,
            Compose,
            InterpolationMode,
            Normalize,
            RandomResizedCrop,
            Resize,
            ToTensor,
        )

        r, bicubic = self.resolution, InterpolationMode.BICUBIC
        resize = (
            [RandomResizedCrop(r, scale=(0.9, 1.0), interpolation=bicubic)]
            if self.is_train
            else [Resize(r, interpolation=bicubic), CenterCrop(r)]
        )
        return Compose([*resize, _to_rgb, ToTensor(), Normalize(MEAN, STD)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self._pipeline is None:
            self._pipeline = self._build()
        return self._pipeline(image)

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, is_train={self.is_train})"


def image_transform(resolution: int, is_train: bool = False) -> ImageTransform:
    """CLIP's preprocessing for PIL images at input size `resolution` (see ImageTransform)."""
    return ImageTransform(resolution, is_train)


_MEAN_T = torch.tensor(MEAN).view(3, 1, 1)
_STD_T = torch.tensor(STD).view(3, 1, 1)


def array_to_tensor(arr: np.ndarray, resolution: int, is_train: bool = False) -> torch.Tensor:
    """A stored image array -> normalised (3, R, R) float tensor.

    Floating (3, R', R') arrays are already CLIP-preprocessed: used as is (resized if R' != R).
    uint8 (R', R', 3) arrays are raw RGB: resized/cropped as `image_transform` does, then normalised.
    """
    if arr.ndim == 3 and arr.shape[0] == 3 and np.issubdtype(arr.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if t.shape[1:] != (resolution, resolution):
            t = torch.nn.functional.interpolate(
                t[None],
                size=(resolution, resolution),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )[0]
        return t
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8:
        if not is_train and arr.shape[:2] == (
            resolution,
            resolution,
        ):  # resize + crop would be the identity
            t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
            return (t - _MEAN_T) / _STD_T
        return image_transform(resolution, is_train)(Image.fromarray(arr))
    raise ValueError(
        f"unsupported image array: shape {tuple(arr.shape)}, dtype {arr.dtype} "
        "(expected float (3, R, R) preprocessed or uint8 (R, R, 3) RGB)"
    )
