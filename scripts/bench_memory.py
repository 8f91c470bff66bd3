"""Peak memory of one AGREE training step (all five terms) vs batch size, for each memory lever.

Each (model, lever, batch) runs in a fresh child process: the model is built as training/main_all.py
builds it with the lever's flags, and two optimiser steps (AdamW state included) run on a synthetic
batch. Measured: on the CPU the child's peak resident set size (getrusage ru_maxrss); on CUDA
torch.cuda.max_memory_allocated. The batch is the examples per optimiser step and worker (for
accum-freq: K micro-batches of batch/K). With --budget-gb, the largest batch that fits is searched
for each lever (doubling, then bisection; an out-of-memory error counts as not fitting).

    python scripts/bench_memory.py                                  # CPU: tiny and ViT-B-32
    python scripts/bench_memory.py --models tiny --budget-gb 2
    python scripts/bench_memory.py --goal                           # CUDA: the ViT-L/14 goals
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Callable, Optional

from agree.cli import HelpFormatter
from training.memory_probe import ACCUM, LEVERS, measure

GB = 1e9
GOAL_MODEL = "ViT-L-14"


# --------------------------------------------------------------------------- child: one measurement
def _child_main(spec: str) -> int:
    s = json.loads(spec)
    if s.get("threads"):
        import torch

        torch.set_num_threads(s["threads"])
    try:
        out = {"ok": True, **measure(s["model"], s["batch"], s["flags"], s["device"])}
    except Exception as e:  # noqa: BLE001 - reported to the parent; CUDA OOM means "does not fit"
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        out = {
            "ok": False,
            "oom": oom,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        }
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------- parent
def run_child(
    model: str, batch: int, flags: list[str], device: str, threads: Optional[int]
) -> dict:
    """One measurement in a fresh Python process (a killed child, e.g. by the OOM killer, did not fit)."""
    spec = json.dumps(
        {"model": model, "batch": batch, "flags": flags, "device": device, "threads": threads}
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", spec], capture_output=True, text=True
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {
        "ok": False,
        "oom": proc.returncode < 0,
        "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}",
    }


def largest_fitting(
    fits: Callable[[int], bool],
    start: int,
    unit: int = 1,
    limit: int = 4096,
    resolution: float = 0.0,
) -> tuple[int, Optional[int]]:
    """(largest multiple of `unit` in [unit, limit] found to fit, smallest found not to fit or None if `limit` fits).

    For a monotone `fits`: doubles from `start` (rounded to a multiple of `unit`) while it fits, then
    bisects between the last fit (or 0) and the first miss until they are `unit` apart, or closer than
    `resolution` x the fit.
    """
    cap = limit // unit * unit
    lo, n = 0, min(cap, max(unit, start // unit * unit))
    while fits(n):
        lo = n
        if n == cap:
            return lo, None
        n = min(cap, 2 * n)
    hi = n
    while hi - lo > max(unit, resolution * lo):
        mid = max(lo + unit, (lo + hi) // 2 // unit * unit)
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _fits(
    model: str, flags: list[str], device: str, threads: Optional[int], budget_gb: float
) -> Callable[[int], bool]:
    """batch -> whether one AGREE step at that batch ran with a peak within `budget_gb`."""

    def fits(batch: int) -> bool:
        r = run_child(model, batch, flags, device, threads)
        return r["ok"] and r["peak"] <= budget_gb * GB

    return fits


def _unit(flags: list[str]) -> int:
    return int(flags[flags.index("--accum-freq") + 1]) if "--accum-freq" in flags else 1


def _fmt(r: dict, delta: bool = False) -> str:
    """Peak GB (with delta: and its increase over the memory before the first step, on the CPU)."""
    if not r["ok"]:
        return "OOM" if r.get("oom") else "error"
    if delta:
        return f"{r['peak'] / GB:.2f} (+{(r['peak'] - r['rss_before_steps']) / GB:.2f})"
    return f"{r['peak'] / GB:.2f}"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def table(
    models: list[str],
    batches: list[int],
    levers: list[str],
    device: str,
    threads: Optional[int],
    budget: Optional[float],
    resolution: float,
) -> None:
    """Print one markdown table per model: peak GB per (batch, lever), then the largest batch within the budget."""
    for model in models:
        how = (
            "GB"
            if device.startswith("cuda")
            else "GB (+ increase over the RSS before the first step)"
        )
        print(
            f"\n[{model}] peak memory of an AGREE step (all five terms), {how}; batch = examples per step and worker"
        )
        print("| batch | " + " | ".join(levers) + " |")
        print("|---:|" + "---:|" * len(levers))
        for b in batches:
            cells = []
            for lever in levers:
                flags = LEVERS[lever]
                if b % _unit(flags):
                    cells.append("-")
                    continue
                r = run_child(model, b, flags, device, threads)
                if not r["ok"] and not r.get("oom"):
                    print(f"  ({lever}, batch {b}: {r['error']})", file=sys.stderr)
                cells.append(_fmt(r, delta=not device.startswith("cuda")))
            print(f"| {b} | " + " | ".join(cells) + " |", flush=True)
        if budget:
            best = []
            for lever in levers:
                unit = _unit(LEVERS[lever])
                fits = _fits(model, LEVERS[lever], device, threads, budget)
                lo, hi = largest_fitting(fits, max(batches[0], unit), unit, resolution=resolution)
                best.append(f"{lo}" + (f" (not {hi})" if hi is not None and hi - lo > unit else ""))
            print(f"| largest batch in {budget:g} GB | " + " | ".join(best) + " |", flush=True)


def goal(device: str, threads: Optional[int]) -> int:
    """Issue 11's goals for ViT-L/14 on one GPU: batch 8 in <= 40 GB; >= 32 in 80 GB with checkpointing."""
    r8 = run_child(GOAL_MODEL, 8, [], device, threads)
    ok1 = r8["ok"] and r8["peak"] <= 40 * GB
    print(
        f"goal 1: {GOAL_MODEL}, batch 8 per worker, all five terms, default precision: "
        f"{_fmt(r8)} GB (<= 40 GB: {'met' if ok1 else 'NOT met'})"
    )
    n, _ = largest_fitting(
        _fits(GOAL_MODEL, LEVERS["grad-checkpointing"], device, threads, 80), 32, resolution=0.125
    )
    print(
        f"goal 2: {GOAL_MODEL} with --grad-checkpointing: largest batch per worker in 80 GB = {n} "
        f"(>= 32: {'met' if n >= 32 else 'NOT met'})"
    )
    return 0 if ok1 and n >= 32 else 1


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help=f"default: tiny and ViT-B-32 on the CPU, {GOAL_MODEL} on CUDA",
    )
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=int,
        default=None,
        help="examples per step and worker (default: 8 16 32 on the CPU, 8 16 32 64 on CUDA)",
    )
    p.add_argument(
        "--levers",
        nargs="+",
        choices=list(LEVERS),
        default=list(LEVERS),
        metavar="LEVER",
        help=f"subset of: {', '.join(LEVERS)}",
    )
    p.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help="also find, per lever, the largest batch whose peak fits in this many GB (10^9 bytes)",
    )
    p.add_argument(
        "--resolution",
        type=float,
        default=0.0,
        help="stop the --budget-gb bisection once the fit and the miss are closer than this fraction "
        "of the fit (default 0: exact, in units of the accumulation factor)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (CPU)")
    p.add_argument(
        "--goal",
        action="store_true",
        help=f"CUDA only: check {GOAL_MODEL} batch 8 <= 40 GB and >= 32 in 80 GB with checkpointing",
    )
    return p


def main() -> int:
    """Parse flags; run the children; print the tables (or the goal check)."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return _child_main(sys.argv[2])
    a = build_parser().parse_args()

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    if (a.goal or on_cuda) and not torch.cuda.is_available():
        print("error: CUDA is not available", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({os.cpu_count()} cores)"
    metric = "torch.cuda.max_memory_allocated" if on_cuda else "peak RSS of the child process"
    print(
        f"device: {name}; torch {torch.__version__}; metric: {metric}; accum-freq lever: K={ACCUM}; {_load()}"
    )
    if a.goal:
        status = goal(device, a.threads)
    else:
        models = a.models or ([GOAL_MODEL] if on_cuda else ["tiny", "ViT-B-32"])
        batches = a.batch_sizes or ([8, 16, 32, 64] if on_cuda else [8, 16, 32])
        table(models, batches, a.levers, device, a.threads, a.budget_gb, a.resolution)
        status = 0
    print(f"finished; {_load()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
