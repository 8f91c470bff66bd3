"""AGREE fine-tuning entry point: `python3 -u training/main_all.py ...` or `torchrun --nproc_per_node=N training/main_all.py ...`."""
from __future__ import annotations

from typing import Optional, Sequence

from agree.io import run_cli
from training.distributed import cleanup, init_distributed
from training.engine import run
from training.params import parse_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, join the process group if launched by torchrun, train."""
    args = parse_args(argv)
    env = init_distributed(args.device, args.dist_backend, args.dist_url, args.gpu)
    try:
        run(args, env)
    finally:
        cleanup(env)
    return 0


if __name__ == "__main__":
    run_cli(main)
