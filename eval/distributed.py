"""Feature extraction over several processes (torchrun): each rank encodes a contiguous run of whole
batches, rank 0 gathers the features and writes the one output file in input order.

Because every batch holds the same inputs as in a single-process run, the features are the same
computations as there (bit for bit when the ranks and the single process use the same kernels and
thread count).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from agree.io import InputError

T = TypeVar("T")


@dataclass
class Shard:
    """This process's place among the extraction processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes the outputs."""
        return self.rank == 0

    def span(self, n: int, batch_size: int) -> tuple[int, int]:
        """[start, stop) of this rank's inputs among n: a contiguous run of whole batches of `batch_size`."""
        return span(n, batch_size, self.rank, self.world)


def span(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's share of n inputs cut in batches of `batch_size` (batches split as evenly as can be)."""
    n_batches = -(-n // batch_size)
    b0, b1 = rank * n_batches // world, (rank + 1) * n_batches // world
    return min(n, b0 * batch_size), min(n, b1 * batch_size)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


def init_shard(device: torch.device) -> tuple[Shard, torch.device]:
    """Join torchrun's process group (WORLD_SIZE > 1) and give each rank its device (cuda:LOCAL_RANK)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Shard(), device
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Shard(rank, world), device


def close_shard(shard: Shard) -> None:
    """Leave the process group (no-op in a single process)."""
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def run_everywhere(shard: Shard, device: torch.device, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it fails on any rank, fail on all of them (none waits forever).

    The rank that failed raises its own error; the others an InputError naming it.
    """
    if shard.world == 1:
        return work()
    error: BaseException | None = None
    result = None
    try:
        result = work()
    except Exception as e:  # reported below, after every rank knows
        error = e
    flag = torch.tensor([shard.rank + 1 if error is not None else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    failed = int(flag.item()) - 1
    if error is not None:
        raise error
    if failed >= 0:
        raise InputError(f"extraction failed on rank {failed} (see its message)")
    return result  # type: ignore[return-value]


def rows_in_order(
    shard: Shard,
    device: torch.device,
    blocks: Iterable[np.ndarray],
    n_total: int,
    batch_size: int,
    row_shape: tuple[int, ...],
) -> Iterator[tuple[int, np.ndarray]]:
    """(position of the first row, rows) of every input, in input order, on the writing rank.

    `blocks` are this rank's encoded batches (of its `span`). In a single process they pass
    through as they come (streaming); with several ranks rank 0 yields everything once gathered,
    and the other ranks yield nothing.
    """
    if shard.world == 1:
        start = 0
        for block in blocks:
            yield start, block
            start += len(block)
        return

    def encode_mine() -> np.ndarray:
        mine = list(blocks)
        return np.concatenate(mine) if mine else np.empty((0,) + row_shape, dtype=np.float32)

    full = gather_rows(
        shard, device, run_everywhere(shard, device, encode_mine), n_total, batch_size
    )
    if full is not None:
        yield 0, full


def gather_rows(
    shard: Shard, device: torch.device, local: np.ndarray, n_total: int, batch_size: int
) -> np.ndarray | None:
    """All ranks' rows, in rank order (= input order), on rank 0; None on the others.

    `local` holds this rank's rows (its `span`); every rank passes the same n_total and batch_size.
    """
    if shard.world == 1:
        return local
    counts = [
        b - a for a, b in (span(n_total, batch_size, r, shard.world) for r in range(shard.world))
    ]
    width = max(counts)
    padded = torch.zeros((width,) + local.shape[1:], dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(
        device
    )
    parts = [torch.empty_like(padded) for _ in range(shard.world)] if shard.is_writer else None
    dist.gather(padded, parts, dst=0)
    if not shard.is_writer:
        return None
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])
