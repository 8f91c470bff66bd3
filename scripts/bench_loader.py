"""Benchmark of fine-tuning's data path: AGREE examples per second per worker process, all six terms on.

    python scripts/bench_loader.py [--images 200] [--resolution 224] [--examples 600] [--loader-workers 2]

Generates a synthetic world (synth) at --resolution, prepares its raw downloads four ways with
dataprep's pipeline (uint8 or float32 storage x mask boxes or masked copies), and for each layout
builds the training dataset with every AGREE term on, as training/main_all.py does. Each
configuration runs in a fresh process with one torch thread, which is what one DataLoader worker
is: it builds --examples examples (each: 4 images, 12 texts) and prints the examples per second of
that one process, then the same examples again with the time split into

* reading: the image arrays out of the .npz archives (zip member + .npy header + copy);
* decoding/masking: uint8 -> normalised float32, mask fills, the masked-square fallbacks;
* transform: the array -> the batch tensor (the --augment crop and resize when on);
* tokenising: the texts' token ids (training.tokens, with its per-process cache);
* other: the rest (records, random draws, Visual Genome choice, dict building);

and its peak resident memory. With --loader-workers N it also times a DataLoader with N worker
processes (batch 32) on the default layout. The last line sets the per-worker rate of the default
layout against the rate a GPU run consumes (--consume, examples/s; docs/benchmarks.md derives it)
and prints the worker processes that rate needs.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (storage, masks, augment); the first is prepare_data.py's default layout
    ("uint8", "boxes", "none"),
    ("uint8", "images", "none"),
    ("float32", "boxes", "none"),
    ("float32", "images", "none"),
    ("uint8", "boxes", "random-resized-crop"),
]
PARTS = ("reading", "decoding/masking", "transform", "tokenising")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images", type=int, default=200, help="training images of the world (x5 captions)"
    )
    p.add_argument("--resolution", type=int, default=224, help="stored and model input size R")
    p.add_argument("--examples", type=int, default=600, help="examples timed per configuration")
    p.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="also time a DataLoader with this many worker processes on the default layout (0: skip)",
    )
    p.add_argument(
        "--consume",
        type=float,
        default=None,
        help="examples/s a GPU run consumes: print the worker processes it needs (docs/benchmarks.md)",
    )
    p.add_argument(
        "--work-dir", type=Path, default=None, help="where to build the data (default: a temp dir)"
    )
    return p.parse_args(argv)


def build_layouts(work: Path, images: int, resolution: int) -> dict:
    """The synthetic world's raw downloads, prepared in each (storage, masks) form; {(storage, masks): Layout}."""
    from dataprep.pipeline import PrepareConfig, prepare
    from synth.detector import THRESHOLD
    from synth.writer import SynthConfig, SynthLayout, generate

    generate(
        SynthConfig(
            out=work / "world",
            train_images=images,
            val_images=8,
            test_images=8,
            pretrain_images=0,
            resolution=resolution,
        ),
        progress=False,
    )
    raw = SynthLayout.under(work / "world").raw
    out = {}
    for storage, masks in {(s, m) for s, m, _ in CONFIGS}:
        report = prepare(
            PrepareConfig(
                "flickr30k",
                raw.raw,
                raw.vg_raw,
                work / f"{storage}-{masks}",
                boxes=raw.boxes,
                box_threshold=THRESHOLD,
                resolution=resolution,
                storage=storage,
                masks=masks,
                workers=0,
                progress=False,
                log=lambda line: None,
            )
        )
        out[(storage, masks)] = report.layout
    return out


def _dataset(train_jsonl: Path, resolution: int, augment: str):
    from training.data import resolve_paths
    from training.dataset import build_train_dataset
    from training.params import parse_args as train_args
    from training.terms import AGREE_TERMS, enabled_terms, flags_of

    args = train_args(
        ["--train-data", str(train_jsonl), "--model", "tiny", "--augment", augment]
        + flags_of(AGREE_TERMS)
    )
    return build_train_dataset(args, resolve_paths(args), enabled_terms(args), resolution)


class _Clock:
    """Seconds spent in each part (a wrapped function adds its time to its part, not to the part around it)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._stack: list[str] = []

    def wrap(self, part: str, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            self._stack.append(part)
            try:
                return fn(*a, **k)
            finally:
                self._stack.pop()
                dt = time.perf_counter() - t
                self.seconds[part] += dt
                if self._stack:  # nested: not the enclosing part's time
                    self.seconds[self._stack[-1]] -= dt

        return timed


def _instrument(clock: _Clock) -> None:
    import agree.images as images
    import training.slots as slots
    import training.tokens as tokens

    images.ImageArchive.__getitem__ = clock.wrap("reading", images.ImageArchive.__getitem__)
    images.normalised = clock.wrap("decoding/masking", images.normalised)
    images.fill_boxes = clock.wrap("decoding/masking", images.fill_boxes)
    slots.zero_square = clock.wrap("decoding/masking", slots.zero_square)
    slots.to_batch_tensor = clock.wrap("transform", slots.to_batch_tensor)
    tokens.Tokenizer.__call__ = clock.wrap("tokenising", tokens.Tokenizer.__call__)


def measure(
    train_jsonl: str, resolution: int, augment: str, examples: int, loader_workers: int
) -> dict:
    """One configuration, in this (fresh) process: rate, split, peak memory (and the DataLoader rate)."""
    import torch

    torch.set_num_threads(1)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dset = _dataset(Path(train_jsonl), resolution, augment)
    order = [k % len(dset) for k in range(examples)]
    for k in order[:20]:  # warm-up: archive handles, token cache of the pads, lazy imports
        dset[k]
    dset.set_epoch(
        1
    )  # fresh random draws; the token cache keeps what it learnt, as a worker's does
    t = time.perf_counter()
    for k in order:
        dset[k]
    seconds = time.perf_counter() - t
    clock = _Clock()
    _instrument(clock)
    dset.set_epoch(2)
    t = time.perf_counter()
    for k in order:
        dset[k]
    split_total = time.perf_counter() - t
    out = {
        "rate": examples / seconds,
        "ms": 1e3 * seconds / examples,
        "split": {p: 1e3 * s / examples for p, s in clock.seconds.items()},
        "split_total_ms": 1e3 * split_total / examples,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "start_mib": base_rss / 1024,
    }
    if loader_workers:
        from torch.utils.data import DataLoader

        dset = _dataset(Path(train_jsonl), resolution, augment)
        loader = DataLoader(dset, batch_size=32, shuffle=True, num_workers=loader_workers)
        it = iter(loader)
        next(it)  # workers started
        t, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch["image"])
        out["loader_rate"] = n / (time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the data, time every configuration in a fresh process, print the table."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        work = args.work_dir or Path(tmp)
        t = time.perf_counter()
        layouts = build_layouts(work, args.images, args.resolution)
        n_ex = sum(1 for _ in layouts[("uint8", "boxes")].train_jsonl.open())
        print(
            f"data: synthetic world, {args.images} train images ({n_ex} examples) at {args.resolution} px, "
            f"prepared 4 ways in {time.perf_counter() - t:.0f} s; {args.examples} examples timed per row, "
            "one process with one torch thread = one DataLoader worker",
            flush=True,
        )
        ctx = mp.get_context("spawn")
        results = {}
        for k, (storage, masks, augment) in enumerate(CONFIGS):
            lay = layouts[(storage, masks)]
            workers = args.loader_workers if k == 0 else 0
            with ctx.Pool(1) as pool:
                r = pool.apply(
                    measure,
                    (str(lay.train_jsonl), args.resolution, augment, args.examples, workers),
                )
            results[(storage, masks, augment)] = r
            s = r["split"]
            other = r["split_total_ms"] - sum(s.values())
            print(
                f"{storage:>7} storage, {masks:<6} masks, augment {augment:<19}: "
                f"{r['rate']:6.1f} examples/s per worker ({r['ms']:.2f} ms/example; split: "
                + ", ".join(f"{p} {s[p]:.2f}" for p in PARTS)
                + f", other {other:.2f} ms); peak memory {r['peak_mib']:.0f} MiB per worker "
                f"({r['start_mib']:.0f} MiB at start)",
                flush=True,
            )
            if "loader_rate" in r:
                print(
                    f"{'':>7} DataLoader, {args.loader_workers} worker processes, batch 32: "
                    f"{r['loader_rate']:.1f} examples/s in all",
                    flush=True,
                )
        default = results[CONFIGS[0]]["rate"]
        if args.consume:
            print(
                f"a run consuming {args.consume:g} examples/s needs {math.ceil(args.consume / default)} "
                f"worker processes at {default:.1f} examples/s per worker (default layout)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
