"""Process layout (one process, workers spawned per GPU as the release does, or torchrun's world),
torch.distributed set-up, and feature gathering (docs/method.md §3)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.multiprocessing.spawn import ProcessException

from agree.io import InputError

SINGLE, SPAWN, TORCHRUN = "single", "spawn", "torchrun"


@dataclass
class DistEnv:
    """Where this process sits: rank, world size, local rank, device, and who started the processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    launcher: str = SINGLE

    @property
    def is_master(self) -> bool:
        """True on the rank that writes logs and checkpoints."""
        return self.rank == 0


@dataclass(frozen=True)
class LaunchPlan:
    """How a run is laid out over processes, decided once in the launching process."""

    launcher: str  # SINGLE, SPAWN (main_all.py starts the workers) or TORCHRUN
    world_size: int
    use_cuda: bool
    backend: Optional[str]  # process-group backend when world_size > 1

    def describe(self) -> str:
        """For the log: who started how many processes, and the backend."""
        if self.world_size == 1:
            return "one process"
        who = "started by main_all.py" if self.launcher == SPAWN else "started by torchrun"
        return f"{self.world_size} worker processes {who}, {self.backend}"


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    return default if value in (None, "") else int(value)


def plan_launch(
    nproc: Optional[int],
    device: Optional[str],
    gpu: Optional[int],
    backend: Optional[str],
    environ: Mapping[str, str] = os.environ,
    cuda_devices: Optional[int] = None,
) -> LaunchPlan:
    """The process layout of a run.

    Under torchrun (WORLD_SIZE set) its world is used. Otherwise, as the release's mp.spawn, one worker
    per visible GPU when training on CUDA without a fixed device (--gpu or --device cuda:K), else one
    process; `nproc` (--nproc) sets the number of workers instead (gloo workers on the CPU).
    """
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count()
    use_cuda = cuda_devices > 0 if device is None else device.startswith("cuda")
    if use_cuda and cuda_devices == 0:
        logging.warning("--device %s asked for but CUDA is not available; using the CPU", device)
        use_cuda = False
    if "WORLD_SIZE" in environ:
        if nproc is not None:
            raise InputError(
                "--nproc: this process was started by torchrun (WORLD_SIZE is set), whose "
                "--nproc_per_node sets the number of processes; drop --nproc"
            )
        launcher, world = TORCHRUN, _env_int(environ, "WORLD_SIZE", 1)
    else:
        fixed_device = gpu is not None or (device is not None and ":" in device)
        if nproc is None:
            nproc = cuda_devices if use_cuda and not fixed_device else 1
        if nproc < 1:
            raise InputError(f"--nproc must be >= 1, got {nproc}")
        if nproc > 1 and use_cuda and fixed_device:
            raise InputError(
                f"--nproc {nproc} puts worker k on GPU k; drop --gpu and the index of --device"
            )
        if use_cuda and nproc > cuda_devices:
            raise InputError(
                f"--nproc {nproc}: one worker per GPU, but {cuda_devices} GPU(s) are visible"
            )
        launcher, world = (SPAWN if nproc > 1 else SINGLE), nproc
    if world > 1:
        if backend is None:
            backend = "nccl" if use_cuda else "gloo"
        elif backend == "nccl" and not use_cuda:
            logging.warning("--dist-backend nccl needs CUDA; using gloo on the CPU")
            backend = "gloo"
    return LaunchPlan(launcher, world, use_cuda, backend if world > 1 else None)


def init_distributed(
    plan: LaunchPlan,
    local_rank: int,
    device: Optional[str],
    dist_url: str,
    gpu: Optional[int] = None,
    environ: Mapping[str, str] = os.environ,
) -> DistEnv:
    """Join the process group of `plan` as worker `local_rank` (torchrun: its RANK/LOCAL_RANK); pick the device.

    A torchrun worker rendezvouses at env:// (MASTER_ADDR) when set, a spawned one at `dist_url`.
    """
    rank = local_rank
    if plan.launcher == TORCHRUN:
        rank, local_rank = _env_int(environ, "RANK", 0), _env_int(environ, "LOCAL_RANK", 0)
    if plan.use_cuda:
        if plan.world_size > 1:
            index = local_rank
        elif gpu is not None:
            index = gpu
        elif device is not None and ":" in device:
            index = torch.device(device).index
        else:
            index = torch.cuda.current_device()
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    else:
        dev = torch.device("cpu")
    if plan.world_size <= 1:
        return DistEnv(0, 1, 0, dev, False, plan.launcher)
    init_method = "env://" if plan.launcher == TORCHRUN and "MASTER_ADDR" in environ else dist_url
    dist.init_process_group(
        backend=plan.backend, init_method=init_method, world_size=plan.world_size, rank=rank
    )
    return DistEnv(rank, plan.world_size, local_rank, dev, True, plan.launcher)


def spawn_workers(fn: Callable[..., None], nprocs: int, *args: Any) -> None:
    """Run fn(local_rank, *args) in `nprocs` fresh processes and wait for all (the release's mp.spawn).

    An InputError in a worker stops the others and is raised here with the worker's message.
    """
    errors = mp.get_context("spawn").SimpleQueue()
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # not "Terminating process ..." when a worker stops the run
    try:
        mp.start_processes(
            _spawned, args=(fn, errors, *args), nprocs=nprocs, join=True, start_method="spawn"
        )
    except ProcessException:
        if not errors.empty():
            raise InputError(errors.get()) from None
        raise
    finally:
        spawn_log.setLevel(level)


def _spawned(local_rank: int, fn: Callable[..., None], errors: Any, *args: Any) -> None:
    try:
        fn(local_rank, *args)
    except InputError as e:
        errors.put(str(e))
        sys.exit(2)


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
    return torch.cat([parts[env.rank]] + parts[: env.rank] + parts[env.rank + 1 :])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model
