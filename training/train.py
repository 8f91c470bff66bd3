"""One training step (all AGREE inputs of a batch through the model in one forward pass) and the epoch loop.

A step is one optimiser update over `accum_freq` micro-batches (--accum-freq): with more than one, the
features of every micro-batch are cached first, so that each term sees the whole accumulated batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from agree.precision import autocast, weight_dtype
from clip.model import frozen_bn_stats, uses_batch_statistics
from training.distributed import DistEnv, gather_features, unwrap
from training.terms import IMAGE_SLOTS, TEXT_SLOTS, loss_terms, total_loss

LOGIT_SCALE_MAX = math.log(100)
# The release clamps to the literal 4.6052 (> ln 100 = 4.6051702): --legacy-detached-rank uses it too.
LEGACY_LOGIT_SCALE_MAX = 4.6052


# --------------------------------------------------------------------------- forward
def encode_batch(
    model: nn.Module,
    batch: dict[str, Tensor],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], Tensor]:
    """Encode every image and text slot present in `batch` with one model call.

    Images [B, K_img, 3, R, R] and texts [B, K_txt, L] are flattened to B*K rows; the returned
    features are L2-normalised, fp32 (fp64 for an fp64 model), keyed like the batch (prompts/masked as [B, S, d]).
    An image tower whose BatchNorm layers use batch statistics (a modified ResNet in train mode) encodes
    each image slot in its own tower call, in IMAGE_SLOTS order, so that each slot is normalised with
    its own statistics as the release's separate calls are (see per_slot_images).
    """
    img_slots = [k for k in IMAGE_SLOTS if k in batch]
    txt_slots = [k for k in TEXT_SLOTS if k in batch]
    b = batch["image"].shape[0]
    per_slot = per_slot_images(model, len(img_slots))
    # each slot goes to the device as collated (pinned), then is stacked there: slot-major when the
    # tower encodes slot by slot (consecutive groups), example-major otherwise
    images = torch.stack(
        [batch[k].to(device=device, dtype=dtype, non_blocking=True) for k in img_slots],
        dim=0 if per_slot else 1,
    )
    texts = torch.cat(
        [batch[k] if batch[k].dim() == 3 else batch[k][:, None] for k in txt_slots], dim=1
    )
    widths = [batch[k].shape[1] if batch[k].dim() == 3 else 1 for k in txt_slots]
    images = images.flatten(0, 1)
    texts = texts.flatten(0, 1).to(
        device=device, non_blocking=True
    )  # the text tower cuts trailing padding
    if per_slot:
        img_f, txt_f, scale = model(images, texts, image_groups=len(img_slots))
        img_f = _loss_precision(img_f).view(len(img_slots), b, -1).transpose(0, 1)
    else:
        img_f, txt_f, scale = model(images, texts)
        img_f = _loss_precision(img_f).view(b, len(img_slots), -1)
    txt_f = _loss_precision(txt_f).view(b, sum(widths), -1)
    feats = {k: img_f[:, i] for i, k in enumerate(img_slots)}
    start = 0
    for k, w in zip(txt_slots, widths):
        feats[k] = txt_f[:, start] if batch[k].dim() == 2 else txt_f[:, start : start + w]
        start += w
    return feats, _loss_precision(scale)


def per_slot_images(model: nn.Module, n_slots: int) -> bool:
    """Whether the image slots must go through the image tower one slot per call.

    Only when its BatchNorm layers normalise with batch statistics (train mode and not locked): one
    call over all slots would then normalise each slot with the statistics of the mixture. Other towers
    (ViTs, locked or eval-mode ResNets) give every row the same output either way, in one call.
    """
    return n_slots > 1 and uses_batch_statistics(unwrap(model).visual)


def _loss_precision(x: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 for the loss; fp32 and fp64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
        out[k] = packed[:, start] if feats[k].dim() == 2 else packed[:, start : start + w]
        start += w
    return out


def clamp_logit_scale(model: nn.Module, legacy: bool = False) -> None:
    """Keep the raw logit_scale parameter in [0, ln 100] (`legacy`: [0, 4.6052], the release's bound)."""
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, LEGACY_LOGIT_SCALE_MAX if legacy else LOGIT_SCALE_MAX)


@dataclass
class StepConfig:
    """What a training step needs besides the model, optimiser and batch."""

    terms: Sequence[str]
    env: DistEnv
    precision: str = "fp32"
    aggregate: bool = True
    gather_with_grad: bool = False
    legacy_detached_rank: bool = False  # the release's ranking-term gradients and logit-scale clamp
    grad_clip_norm: Optional[float] = None  # clip the gradient's global L2 norm before each update


Batch = Mapping[str, Tensor]


def _encode(model: nn.Module, batch: Batch, cfg: StepConfig) -> tuple[dict[str, Tensor], Tensor]:
    with autocast(cfg.precision, cfg.env.device):
        return encode_batch(model, batch, cfg.env.device, weight_dtype(cfg.precision))


def _terms(
    feats: dict[str, Tensor], scale: Tensor, cfg: StepConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted total, unweighted terms) of this rank's features, gathered over ranks unless --skip-aggregate."""
    if cfg.aggregate:
        feats = gather_all(feats, cfg.env, cfg.gather_with_grad)
    values = loss_terms(feats, scale, cfg.terms, cfg.legacy_detached_rank)
    return total_loss(values), values


def compute_loss(
    model: nn.Module, batch: Batch, cfg: StepConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward the batch and return (weighted total, unweighted terms) over the global batch."""
    return _terms(*_encode(model, batch, cfg), cfg)


def _backward(total: Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    (scaler.scale(total) if scaler is not None else total).backward()


def accumulate_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    cfg: StepConfig,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Add to .grad the gradient of the loss over the concatenation of `micro_batches`; return its value.

    One micro-batch: forward and backward. Several (--accum-freq): a no-grad pass caches every
    micro-batch's features; then each micro-batch is encoded again with gradient, its rows replace
    its cached ones, and the loss over the whole accumulated batch is back-propagated. The sum of these
    backward passes is the gradient of one step over the concatenated batch (the contrastive terms
    see all of it), while only one micro-batch's activations are alive at a time.
    """
    if len(micro_batches) == 1:
        total, values = compute_loss(model, micro_batches[0], cfg)
        _backward(total, scaler)
        return total, values
    with (
        torch.no_grad(),
        frozen_bn_stats(model),
    ):  # BatchNorm statistics: counted in the passes below
        cached = [_encode(model, mb, cfg)[0] for mb in micro_batches]
    last = len(micro_batches) - 1
    for i, mb in enumerate(micro_batches):
        # DDP: reduce the gradients once, in the last backward pass
        sync = (
            model.no_sync() if i < last and hasattr(model, "no_sync") else contextlib.nullcontext()
        )
        with sync:
            fresh, scale = _encode(model, mb, cfg)
            feats = {
                k: torch.cat([fresh[k] if j == i else c[k] for j, c in enumerate(cached)])
                for k in fresh
            }
            # every pass sees logit_scale; only the last one back-propagates into it, so it is counted once
            total, values = _terms(feats, scale if i == last else scale.detach(), cfg)
            _backward(total, scaler)
    return total, values


def train_step(
    model: nn.Module,
    batch: Union[Batch, Sequence[Batch]],
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler],
    cfg: StepConfig,
) -> dict[str, float]:
    """One optimiser step over a batch or a list of micro-batches; returns the loss and its terms as floats."""
    micro_batches = [batch] if isinstance(batch, Mapping) else list(batch)
    optimizer.zero_grad(set_to_none=True)
    total, values = accumulate_gradients(model, micro_batches, cfg, scaler)
    if cfg.grad_clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], cfg.grad_clip_norm
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scale(model, cfg.legacy_detached_rank)
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
    total_steps: int  # steps of the whole --epochs schedule (the learning rate follows it)
    global_batch: (
        int  # examples per optimiser step over all ranks (batch x accum_freq x world size)
    )
    accum_freq: int = 1  # micro-batches (loader batches) per optimiser step
    log_every: int = 100
    writer: Any = None  # TensorBoard SummaryWriter (rank 0) or None
    wandb: Any = None  # wandb module (rank 0) or None
    on_step_end: Optional[Callable[[int, int], None]] = (
        None  # (epoch, steps done) -> e.g. checkpointing
    )
    history: Optional[list] = (
        None  # if a list: (step, losses) of every step is appended (tests, benchmarks)
    )
    end_step: int = 0  # the step this run stops after (--stop-after-epoch); 0 = total_steps


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _log_progress(
    ctx: TrainContext,
    epoch: int,
    step: int,
    losses: dict[str, float],
    lr: float,
    rate: float,
    eta: float,
) -> None:
    """One log line, and the same scalars to TensorBoard / wandb."""
    scale = unwrap(ctx.model).logit_scale.exp().item()
    in_epoch = step - epoch * ctx.steps_per_epoch
    terms = " ".join(f"{k} {v:.6f}" for k, v in losses.items() if k != "loss")
    logging.info(
        f"Train Epoch: {epoch} [{in_epoch}/{ctx.steps_per_epoch}] step {step} "
        f"loss {losses['loss']:.6f} ({terms}) lr {lr:.4e} logit_scale {scale:.3f} "
        f"samples/s {rate:.1f} eta {_fmt_eta(eta)}"
    )
    scalars = {f"train/{k}": v for k, v in losses.items()}
    scalars.update({"train/lr": lr, "train/logit_scale": scale, "train/samples_per_second": rate})
    if ctx.writer is not None:
        for k, v in scalars.items():
            ctx.writer.add_scalar(k, v, step)
    if ctx.wandb is not None:
        ctx.wandb.log(scalars, step=step)


def train_one_epoch(
    ctx: TrainContext, loader: Iterable, epoch: int, first_step: int
) -> dict[str, float]:
    """Run the steps of `epoch` from global step `first_step`; log every ctx.log_every steps."""
    ctx.model.train()
    env = ctx.cfg.env
    end_step = (epoch + 1) * ctx.steps_per_epoch
    step = first_step
    t_last, n_since, t_start, steps_timed = time.time(), 0, time.time(), 0
    sums: dict[str, float] = {}
    micro_batches: list = []
    for batch in loader:
        if step >= end_step:
            break
        micro_batches.append(batch)
        if len(micro_batches) < ctx.accum_freq:
            continue
        lr = ctx.set_lr(step)
        losses = train_step(ctx.model, micro_batches, ctx.optimizer, ctx.scaler, ctx.cfg)
        micro_batches = []
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
            eta = (now - t_start) / steps_timed * ((ctx.end_step or ctx.total_steps) - step)
            _log_progress(ctx, epoch, step, losses, lr, rate, eta)
            t_last, n_since = now, 0
        if ctx.on_step_end is not None:
            ctx.on_step_end(epoch, step)
    done = max(1, step - first_step)
    return {k: v / done for k, v in sums.items()}
