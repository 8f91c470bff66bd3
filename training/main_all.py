"""AGREE fine-tuning entry point: `python3 -u training/main_all.py ...` (one worker per visible GPU, as the
release; --nproc N to choose) or `torchrun --nproc_per_node=N -- training/main_all.py ...`."""

from __future__ import annotations

from typing import Optional, Sequence

from agree.io import run_cli
from training.distributed import SPAWN, plan_launch, spawn_workers
from training.engine import train_worker
from training.params import parse_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, lay the run out over processes (spawning the workers if needed), train."""
    args = parse_args(argv)
    plan = plan_launch(args.nproc, args.device, args.gpu, args.dist_backend)
    if plan.launcher == SPAWN:
        spawn_workers(train_worker, plan.world_size, plan, args)
    else:
        train_worker(0, plan, args)
    return 0


if __name__ == "__main__":
    run_cli(main)
