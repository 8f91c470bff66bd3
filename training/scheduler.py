"""Learning-rate schedule: linear warm-up, then cosine decay to 0 (docs/method.md §4)."""

from __future__ import annotations

import math
from typing import Callable

import torch


def lr_at(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """Learning rate of optimiser step `step` (0-based)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay = total_steps - warmup
    if decay <= 0:
        return base_lr
    progress = min(step - warmup, decay) / decay
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * base_lr


def cosine_lr(
    optimizer: torch.optim.Optimizer, base_lr: float, warmup: int, total_steps: int
) -> Callable[[int], float]:
    """A function that sets every param group's lr for a step and returns it."""

    def set_lr(step: int) -> float:
        lr = lr_at(step, base_lr, warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    return set_lr


def constant_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> Callable[[int], float]:
    """--skip-scheduler: the same lr at every step."""

    def set_lr(step: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = base_lr
        return base_lr

    return set_lr
