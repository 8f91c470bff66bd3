#!/usr/bin/env python3
"""Every CUDA path of the project in one command, for the first GPU: at most 8 minutes on one 80 GB GPU.

    python3 scripts/gpu_check.py --out gpu_check.json

Checks (see docs/benchmarks.md): feature extraction at fp32, amp, fp16, bf16 and amp_bf16 with the recall
difference on the demo's test split (the demo's quick world and a tiny-rn backbone, taken from --cache or
pre-trained on the GPU); an AGREE step (all six terms) of ViT-B/32 and ViT-L/14 from random weights
with each memory lever and its peak memory; NCCL with one process; fused AdamW; the large-gallery
top-k with the torch backend against numpy; a step under --torchcompile. Each check runs whatever the
others do; the table (check, status, seconds, key number) is printed and written as JSON to --out.
Exit status: 0 when no check failed, 1 otherwise. Without a GPU nothing runs (exit status 0);
--device cpu runs the checks that can run on a CPU at toy sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agree.cli import HelpFormatter
from agree.io import InputError, run_cli
from agree.ownership import OutputFolder

OWNER = "scripts/gpu_check.py"


def build_parser() -> argparse.ArgumentParser:
    """--out, --device, --cache, --work, --only, --list, --keep."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON record")
    p.add_argument(
        "--device",
        default="cuda",
        help="cuda or cuda:N (default cuda); cpu: a dry run of the CPU-capable checks at toy sizes",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=Path("tmp/cache"),
        help="the demo's cache: its quick world is built there if missing (CPU); its quick backbone "
        "is used if present, else one is pre-trained on the device (into --work, not the cache)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("tmp/gpu_check"),
        help="scratch: this run's files go to its sub-folder files/, deleted at the end (unless "
        "--keep); nothing else in it is touched",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="NAME",
        help="run only the checks whose name starts with one of these (see --list)",
    )
    p.add_argument("--list", action="store_true", help="print the checks' names and exit")
    p.add_argument("--keep", action="store_true", help="keep the scratch files (features, runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the table, write the JSON; exit status 1 if a check failed."""
    args = build_parser().parse_args(argv)
    import torch

    from experiments.gpu_check import (
        CPU_SIZES,
        GPU_SIZES,
        TIME_GOAL_S,
        Context,
        checks,
        device_description,
        passed,
        run_checks,
        select,
        table,
        write_results,
    )

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"--device: unknown device {args.device!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    selected = select(checks(sizes), args.only)
    if args.list:
        print("\n".join(c.name for c in checks(GPU_SIZES)))
        return 0
    if not selected:
        raise InputError(f"--only {' '.join(args.only)}: no check has such a name (see --list)")
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device, so nothing was run and nothing was written "
            "(--device cpu runs the checks that can run on a CPU, at toy sizes)"
        )
        return 0
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    os.environ.setdefault("TQDM_DISABLE", "1")  # the extraction scripts' progress bars
    folder = OutputFolder(args.work, OWNER)
    ctx = Context(device, sizes, args.cache, folder.scratch("files"))
    print(
        f"gpu_check: {len(selected)} checks on {device_description(device)} "
        f"(goal: at most {TIME_GOAL_S // 60} min on one 80 GB GPU)",
        flush=True,
    )

    def progress(r) -> None:
        print(f"[{r.status}] {r.check} ({r.seconds:.1f} s): {r.key}", flush=True)

    try:
        results = run_checks(selected, ctx, progress)
    finally:
        if not args.keep:
            folder.remove_owned()
    print()
    print(table(results))
    total = sum(r.seconds for r in results)
    print(
        f"\n{sum(r.status == 'ok' for r in results)} ok, {sum(r.status == 'fail' for r in results)} "
        f"failed, {sum(r.status == 'skip' for r in results)} skipped in {total:.0f} s; "
        f"written to {args.out}"
    )
    write_results(args.out, results, device, ["scripts/gpu_check.py", *(argv or sys.argv[1:])])
    return 0 if passed(results) else 1


if __name__ == "__main__":
    run_cli(main)
