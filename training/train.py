"""One training step (all AGREE inputs of a batch through the model in one forward pass), epochs, validation."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from clip.clip import tokenize
from training.data import ValData, ValImages
from training.distributed import DistEnv, gather_features
from training.loss import contrastive, loss_terms, total_loss

IMAGE_SLOTS = ("image", "da_image", "da_image_masked", "vg_masked")   # [B, 3, R, R] each
TEXT_SLOTS = ("text", "prompts", "masked", "da_text")                 # [B, 77] or [B, S, 77]
LOGIT_SCALE_MAX = math.log(100)


# --------------------------------------------------------------------------- precision
def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for --precision amp on CUDA, else a no-op."""
    if precision == "amp" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def input_dtype(precision: str) -> torch.dtype:
    """dtype of image batches fed to the model."""
    return torch.float16 if precision == "fp16" else torch.float32


def unwrap(model: nn.Module) -> nn.Module:
    """The CLIP model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def trim_context(tokens: Tensor) -> Tensor:
    """Drop trailing all-padding token columns (the causal text tower never attends past end-of-text)."""
    used = int((tokens != 0).any(dim=0).nonzero().max()) + 1 if tokens.numel() else 1
    return tokens[:, :used]


# --------------------------------------------------------------------------- forward
def encode_batch(model: nn.Module, batch: dict[str, Tensor], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], Tensor]:
    """Encode every image and text slot present in `batch` with one model call.

    Images [B, K_img, 3, R, R] and texts [B, K_txt, L] are flattened to B*K rows; the returned
    features are L2-normalised, fp32, keyed like the batch (prompts/masked as [B, S, d]).
    """
    img_slots = [k for k in IMAGE_SLOTS if k in batch]
    txt_slots = [k for k in TEXT_SLOTS if k in batch]
    b = batch["image"].shape[0]
    # each slot goes to the device as collated (pinned), then is stacked there
    images = torch.stack([batch[k].to(device=device, dtype=dtype, non_blocking=True) for k in img_slots], dim=1)
    texts = torch.cat([batch[k] if batch[k].dim() == 3 else batch[k][:, None] for k in txt_slots], dim=1)
    widths = [batch[k].shape[1] if batch[k].dim() == 3 else 1 for k in txt_slots]
    images = images.flatten(0, 1)
    texts = trim_context(texts.flatten(0, 1)).to(device=device, non_blocking=True)
    img_f, txt_f, scale = model(images, texts)
    img_f = img_f.float().view(b, len(img_slots), -1)
    txt_f = txt_f.float().view(b, sum(widths), -1)
    feats = {k: img_f[:, i] for i, k in enumerate(img_slots)}
    start = 0
    for k, w in zip(txt_slots, widths):
        feats[k] = txt_f[:, start] if batch[k].dim() == 2 else txt_f[:, start:start + w]
        start += w
    return feats, scale.float()


def gather_all(feats: dict[str, Tensor], env: DistEnv, with_grad: bool) -> dict[str, Tensor]:
    """Gather every feature set across ranks in one collective (this rank's rows first)."""
    if not env.distributed:
        return feats
    keys = list(feats)
    parts = [feats[k] if feats[k].dim() == 3 else feats[k][:, None] for k in keys]
    widths = [p.shape[1] for p in parts]
    packed = gather_features(torch.cat(parts, dim=1), env, with_grad)
    out, start = {}, 0
    for k, w in zip(keys, widths):
        out[k] = packed[:, start] if feats[k].dim() == 2 else packed[:, start:start + w]
        start += w
    return out


def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the raw logit_scale parameter in [0, ln 100]."""
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, LOGIT_SCALE_MAX)


@dataclass
class StepConfig:
    """What a training step needs besides the model, optimiser and batch."""
    terms: Sequence[str]
    env: DistEnv
    precision: str = "fp32"
    aggregate: bool = True
    gather_with_grad: bool = False
    legacy_detached_rank: bool = False


def compute_loss(model: nn.Module, batch: dict[str, Tensor], cfg: StepConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward the batch and return (weighted total, unweighted terms) over the global batch."""
    with autocast(cfg.precision, cfg.env.device):
        feats, scale = encode_batch(model, batch, cfg.env.device, input_dtype(cfg.precision))
    if cfg.aggregate:
        feats = gather_all(feats, cfg.env, cfg.gather_with_grad)
    values = loss_terms(feats, scale, cfg.terms, cfg.legacy_detached_rank)
    return total_loss(values), values


def train_step(model: nn.Module, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer,
               scaler: Optional[torch.amp.GradScaler], cfg: StepConfig) -> dict[str, float]:
    """One optimiser step; returns the loss and its terms (global batch) as floats."""
    optimizer.zero_grad(set_to_none=True)
    total, values = compute_loss(model, batch, cfg)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    clamp_logit_scale(model)
    out = {"loss": total.detach()}
    out.update({k: v.detach() for k, v in values.items()})
    flat = torch.stack(list(out.values())).cpu().tolist()
    return dict(zip(out.keys(), flat))


# --------------------------------------------------------------------------- epochs
@dataclass
class TrainContext:
    """Everything the epoch loop uses."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    set_lr: Callable[[int], float]
    cfg: StepConfig
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    log_every: int = 100
    writer: Any = None           # TensorBoard SummaryWriter (rank 0) or None
    wandb: Any = None            # wandb module (rank 0) or None
    on_step_end: Optional[Callable[[int, int], None]] = None   # (epoch, steps done) -> e.g. checkpointing
    history: Optional[list] = None     # if a list: (step, losses) of every step is appended (tests, benchmarks)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train_one_epoch(ctx: TrainContext, loader: Iterable, epoch: int, first_step: int) -> dict[str, float]:
    """Run the steps of `epoch` from global step `first_step`; log every ctx.log_every steps."""
    ctx.model.train()
    env = ctx.cfg.env
    end_step = (epoch + 1) * ctx.steps_per_epoch
    step = first_step
    t_last, n_since, t_start, steps_timed = time.time(), 0, time.time(), 0
    sums: dict[str, float] = {}
    for batch in loader:
        if step >= end_step:
            break
        lr = ctx.set_lr(step)
        losses = train_step(ctx.model, batch, ctx.optimizer, ctx.scaler, ctx.cfg)
        step += 1
        n_since += 1
        steps_timed += 1
        if ctx.history is not None:
            ctx.history.append((step, losses))
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        if not all(math.isfinite(v) for v in losses.values()):
            logging.warning("step %d: non-finite loss %s", step, losses)
        if env.is_master and (step % ctx.log_every == 0 or step == end_step):
            now = time.time()
            rate = n_since * ctx.global_batch / max(now - t_last, 1e-9)
            eta = (now - t_start) / steps_timed * (ctx.total_steps - step)
            scale = unwrap(ctx.model).logit_scale.exp().item()
            in_epoch = step - epoch * ctx.steps_per_epoch
            terms = " ".join(f"{k} {v:.6f}" for k, v in losses.items() if k != "loss")
            logging.info(f"Train Epoch: {epoch} [{in_epoch}/{ctx.steps_per_epoch}] step {step} "
                         f"loss {losses['loss']:.6f} ({terms}) lr {lr:.4e} logit_scale {scale:.3f} "
                         f"samples/s {rate:.1f} eta {_fmt_eta(eta)}")
            scalars = {f"train/{k}": v for k, v in losses.items()}
            scalars.update({"train/lr": lr, "train/logit_scale": scale, "train/samples_per_second": rate})
            if ctx.writer is not None:
                for k, v in scalars.items():
                    ctx.writer.add_scalar(k, v, step)
            if ctx.wandb is not None:
                ctx.wandb.log(scalars, step=step)
            t_last, n_since = now, 0
        if ctx.on_step_end is not None:
            ctx.on_step_end(epoch, step)
    done = max(1, step - first_step)
    return {k: v / done for k, v in sums.items()}


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def encode_val(model: nn.Module, val: ValData, resolution: int, batch_size: int, workers: int,
               device: torch.device, precision: str) -> tuple[Tensor, Tensor]:
    """L2-normalised features of every val image and every val caption (fp32, on `device`)."""
    model = unwrap(model)
    loader = DataLoader(ValImages(val, resolution), batch_size=batch_size, num_workers=workers)
    img = []
    for images in loader:
        with autocast(precision, device):
            img.append(F.normalize(model.encode_image(images.to(device, input_dtype(precision))).float(), dim=-1))
    txt = []
    for i in range(0, len(val.captions), batch_size):
        tokens = trim_context(tokenize(val.captions[i:i + batch_size])).to(device)
        with autocast(precision, device):
            txt.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(img), torch.cat(txt)


def retrieval_metrics(img: Tensor, txt: Tensor, caption_image: Sequence[int], scale: float,
                      batch_size: int) -> dict[str, float]:
    """Val loss and R@1/5/10 both ways (percent) from normalised features.

    The loss pairs each image with its k-th caption (k = 1..5), in batches of `batch_size`, and
    averages the global contrastive term over all pairs.
    """
    owner = torch.as_tensor(list(caption_image), device=img.device)
    sim = txt @ img.t()                                     # [captions, images]
    # T2I: rank of the caption's own image
    gt = sim.gather(1, owner[:, None])
    t2i_rank = (sim > gt).sum(1)
    # I2T: rank of the best-scoring caption of the image
    own = owner[None, :] == torch.arange(img.shape[0], device=img.device)[:, None]   # [images, captions]
    best = sim.t().masked_fill(~own, float("-inf")).max(1, keepdim=True).values
    i2t_rank = (sim.t() > best).sum(1)
    out = {}
    for k in (1, 5, 10):
        out[f"image_to_text_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"text_to_image_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    out["mean_recall"] = sum(v for k, v in out.items() if "R@" in k) / 6
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
            c = caps_t[j:j + batch_size]
            n = c.shape[0]
            total += contrastive(img[owner[c]], txt[c], scale_t).item() * n
            count += n
    out["val_loss"] = total / max(count, 1)
    return out


def evaluate(model: nn.Module, val: ValData, resolution: int, batch_size: int, workers: int,
             device: torch.device, precision: str) -> dict[str, float]:
    """Validation loss and recall of the current model."""
    was_training = model.training
    model.eval()
    img, txt = encode_val(model, val, resolution, batch_size, workers, device, precision)
    scale = unwrap(model).logit_scale.exp().item()
    metrics = retrieval_metrics(img, txt, val.caption_image, scale, batch_size)
    model.train(was_training)
    return metrics
