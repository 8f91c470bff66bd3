"""torch.distributed set-up (torchrun env:// or single process) and feature gathering (spec 3.3)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, local rank, device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_master(self) -> bool:
        """True on the rank that writes logs and checkpoints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(device: str | None, backend: str | None, dist_url: str, gpu: int | None = None) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), pick the device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        logging.warning("--device %s asked for but CUDA is not available; using the CPU", device)
        use_cuda = False
    if use_cuda:
        index = local_rank if world_size > 1 else (gpu if gpu is not None else torch.cuda.current_device())
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if world_size <= 1:
        return DistEnv(0, 1, 0, dev, False)
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    elif backend == "nccl" and not use_cuda:
        logging.warning("--dist-backend nccl needs CUDA; using gloo on the CPU")
        backend = "gloo"
    init_method = "env://" if "MASTER_ADDR" in os.environ else dist_url
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank)
    return DistEnv(rank, world_size, local_rank, dev, True)


def cleanup(env: DistEnv) -> None:
    """Leave the process group."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.distributed:
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each slot's gradient over ranks and returns this rank's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_features(x: Tensor, env: DistEnv, with_grad: bool = False) -> Tensor:
    """Concatenate `x` [n, ...] from every rank along dim 0: this rank's first, then the others in rank order.

    Copies from other ranks carry no gradient unless `with_grad`; this rank's copy always does.
    """
    if not env.distributed or env.world_size == 1:
        return x
    if with_grad:
        parts = list(_AllGatherWithGrad.apply(x).unbind(0))
    else:
        parts = [torch.empty_like(x) for _ in range(env.world_size)]
        dist.all_gather(parts, x.detach().contiguous())
    parts[env.rank] = x if not with_grad else parts[env.rank]
    return torch.cat([parts[env.rank]] + parts[:env.rank] + parts[env.rank + 1:])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
