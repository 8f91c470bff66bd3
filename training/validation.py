"""Validation after each epoch: the val split's images and 5 captions each, loss and recall both ways."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from agree.images import ImageArchive
from agree.io import InputError, read_json
from agree.layout import val_image_key
from agree.metrics import row_from_ranks
from agree.precision import autocast, weight_dtype
from clip.clip import tokenize
from training.data import str_list
from training.distributed import unwrap
from training.loss import contrastive


@dataclass
class ValData:
    """Validation images (archive keys = index in the json) and their captions."""

    images: ImageArchive
    keys: list[str]
    captions: list[str]
    caption_image: list[int]  # image index of every caption


def load_val(path: Path, images_path: Path, caption_key: str) -> ValData:
    """Read flickr30k_val.json (list of {image, caption: [5 captions]}) and its image archive."""
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise InputError(
            f"--val-data: {path} must be a non-empty JSON list of {{image, caption}} objects"
        )
    images = ImageArchive(images_path, "--val-data: val image archive (--val-images)")
    captions: list[str] = []
    owner: list[int] = []
    for i, rec in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(rec, dict) or caption_key not in rec:
            raise InputError(f"{where}: missing key {caption_key!r} (set --caption-key)")
        caps = rec[caption_key]
        caps = [caps] if isinstance(caps, str) else caps
        caps = str_list(caps, repr(caption_key), where)
        if val_image_key(i) not in images:
            raise InputError(
                f"--val-images: {images_path} has no image with key {val_image_key(i)!r} "
                f"(entry {i} of {path})"
            )
        captions += caps
        owner += [i] * len(caps)
    return ValData(images, [val_image_key(i) for i in range(len(data))], captions, owner)


class ValImages(Dataset):
    """Validation images, eval preprocessing."""

    def __init__(self, val: ValData, resolution: int):
        self.val, self.resolution = val, resolution

    def __len__(self) -> int:
        return len(self.val.keys)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.val.images.load_tensor(self.val.keys[index], self.resolution, is_train=False)


@torch.no_grad()
def encode_val(
    model: nn.Module,
    val: ValData,
    resolution: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
) -> tuple[Tensor, Tensor]:
    """L2-normalised features of every val image and every val caption (fp32, on `device`)."""
    model = unwrap(model)
    loader = DataLoader(ValImages(val, resolution), batch_size=batch_size, num_workers=workers)
    img = []
    for images in loader:
        with autocast(precision, device):
            img.append(
                F.normalize(
                    model.encode_image(images.to(device, weight_dtype(precision))).float(), dim=-1
                )
            )
    txt = []
    for i in range(0, len(val.captions), batch_size):
        tokens = tokenize(val.captions[i : i + batch_size]).to(device)
        with autocast(precision, device):
            txt.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(img), torch.cat(txt)


def retrieval_metrics(
    img: Tensor, txt: Tensor, caption_image: Sequence[int], scale: float, batch_size: int
) -> dict[str, float]:
    """Val loss and the recall row (agree.metrics: t2i_r1 ... i2t_r10, rsum; percent) from normalised
    features.

    The loss pairs each image with its k-th caption (k = 1..5), in batches of `batch_size`, and
    averages the global contrastive term over all pairs.
    """
    owner = torch.as_tensor(list(caption_image), device=img.device)
    sim = txt @ img.t()  # [captions, images]
    # T2I: rank of the caption's own image
    gt = sim.gather(1, owner[:, None])
    t2i_rank = (sim > gt).sum(1)
    # I2T: rank of the best-scoring caption of the image
    own = (
        owner[None, :] == torch.arange(img.shape[0], device=img.device)[:, None]
    )  # [images, captions]
    best = sim.t().masked_fill(~own, float("-inf")).max(1, keepdim=True).values
    i2t_rank = (sim.t() > best).sum(1)
    out = row_from_ranks(t2i_rank.cpu().numpy(), i2t_rank.cpu().numpy())
    # loss: image i with its k-th caption
    first = {}
    slots: list[list[int]] = []
    for c, i in enumerate(caption_image):
        k = first.get(i, 0)
        first[i] = k + 1
        while len(slots) <= k:
            slots.append([])
        slots[k].append(c)
    scale_t = torch.tensor(scale, device=img.device)
    total, count = 0.0, 0
    for caps in slots:
        caps_t = torch.as_tensor(caps, device=img.device)
        for j in range(0, len(caps), batch_size):
            c = caps_t[j : j + batch_size]
            n = c.shape[0]
            total += contrastive(img[owner[c]], txt[c], scale_t).item() * n
            count += n
    out["val_loss"] = total / max(count, 1)
    return out


def evaluate(
    model: nn.Module,
    val: ValData,
    resolution: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """Validation loss and recall of the current model."""
    was_training = model.training
    model.eval()
    img, txt = encode_val(model, val, resolution, batch_size, workers, device, precision)
    scale = unwrap(model).logit_scale.exp().item()
    metrics = retrieval_metrics(img, txt, val.caption_image, scale, batch_size)
    model.train(was_training)
    return metrics
