"""One AGREE training step as main_all.py would run it, on a synthetic batch: its peak memory and losses.

The machinery of scripts/bench_memory.py (one measurement per child process) and scripts/gpu_check.py
(every lever on the GPU in one process). A lever is a list of training/main_all.py flags.
"""

from __future__ import annotations

import os
import resource
import time

import torch

from agree.precision import resolve_precision
from training.distributed import DistEnv
from training.engine import build_model, build_optimizer, compile_model
from training.params import parse_args
from training.synthetic_batch import make_batch
from training.terms import AGREE_TERMS
from training.train import StepConfig, train_step

ACCUM = 4
# lever name -> extra flags of training/main_all.py
LEVERS = {
    "plain": [],
    "grad-checkpointing": ["--grad-checkpointing"],
    f"accum-freq {ACCUM}": ["--accum-freq", str(ACCUM)],
    "amp_bf16": ["--precision", "amp_bf16"],
    "bf16": ["--precision", "bf16"],
    "lock-image": ["--lock-image"],
    "checkpointing+bf16": ["--grad-checkpointing", "--precision", "bf16"],
}
# the levers that need CUDA: fp16 autocast with a grad scaler, fp16 weights
CUDA_LEVERS = {"amp": ["--precision", "amp"], "fp16": ["--precision", "fp16"]}
AGREE_FLAGS = ["--is-prompt", "--is-mask", "--is-da-loss", "--is-da-mask", "--is-vg"]


def rss_now() -> int:
    """Resident set size of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(
    model_name: str, batch: int, flags: list[str], device_name: str, steps: int = 2
) -> dict:
    """Build the model as main_all.py does with `flags` (--torchcompile included), run `steps` AGREE steps
    (all six terms) at `batch` examples per step; peak memory in bytes and the loss of every step.

    Peak: torch.cuda.max_memory_allocated on CUDA (reset first), the process's peak RSS on the CPU."""
    device = torch.device(device_name)
    args = parse_args(["--train-data", "unused.jsonl", "--model", model_name, *AGREE_FLAGS, *flags])
    if batch % args.accum_freq:
        raise ValueError(f"batch {batch} is not a multiple of --accum-freq {args.accum_freq}")
    precision = resolve_precision(args.precision, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    env = DistEnv(device=device)
    model = build_model(args, device, precision).train()
    optimizer = build_optimizer(model, args)
    model = compile_model(model, args, env)
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" else None
    cfg = StepConfig(terms=AGREE_TERMS, env=env, precision=precision)
    micro = batch // args.accum_freq
    data = make_batch(batch, model.visual.input_resolution)
    micro_batches = [
        {k: v[i * micro : (i + 1) * micro] for k, v in data.items()} for i in range(args.accum_freq)
    ]
    before = rss_now()
    t0 = time.perf_counter()
    losses = [
        train_step(model, micro_batches, optimizer, scaler, cfg)["loss"] for _ in range(steps)
    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "peak": peak,
        "rss_before_steps": before,
        "seconds_per_step": (time.perf_counter() - t0) / steps,
        "loss": losses[-1],
        "losses": losses,
        "precision": precision,
    }
