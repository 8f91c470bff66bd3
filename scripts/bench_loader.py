"""Benchmark of fine-tuning's data path: AGREE examples per second per worker process, all six terms on.

    python scripts/bench_loader.py [--images 200] [--resolution 224] [--examples 600] [--loader-workers 2]

Generates a synthetic world (synth) at --resolution, prepares its raw downloads four ways with
dataprep's pipeline (uint8 or float32 storage x mask boxes or masked copies), and for each layout
builds the training dataset with every AGREE term on, as training/main_all.py does. Each
configuration runs in a fresh process with one torch thread, which is what one DataLoader worker
is: it builds --examples examples (each: 4 images, 12 texts) and collates them by batches of 32, as a
worker does, and prints the examples per second of that one process from its CPU time (the rate on
one idle core; the wall-clock rate, which other load on the machine lowers, is printed beside it),
then does the same work again with its CPU time split into

* reading: the image arrays out of the .npz archives (zip member + .npy header + copy);
* decoding/masking: uint8 -> normalised float32, mask fills, the masked-square fallbacks;
* transform: the array -> the batch tensor (the --augment crop and resize when on);
* tokenising: the texts' token ids (training.tokens; each pass starts with an empty cache);
* collating: stacking 32 examples into a batch (4 x 32 float32 images: 77 MB at 224 px);
* other: the rest (records, random draws, Visual Genome choice, dict building);

and its peak resident memory; also the time clip.tokenize takes for the same texts without any
cache (the synthetic captions repeat more than real ones). With --loader-workers N it also times a
DataLoader with N worker processes (batch 32) on the default layout. Each rate is the best of
--repeat passes (the machine may be shared). The last line sets the per-worker rate of the default
layout against the rate a GPU run consumes (--consume, examples/s; docs/benchmarks.md derives it)
and prints the worker processes that rate needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agree.cli import HelpFormatter

CONFIGS = [  # (storage, masks, augment); the first is prepare_data.py's default layout
    ("uint8", "boxes", "none"),
    ("uint8", "images", "none"),
    ("float32", "boxes", "none"),
    ("float32", "images", "none"),
    ("uint8", "boxes", "random-resized-crop"),
]
PARTS = ("reading", "decoding/masking", "transform", "tokenising", "collating")
BATCH = 32


def build_parser() -> argparse.ArgumentParser:
    """The flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
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
    p.add_argument("--repeat", type=int, default=3, help="passes per rate (the best counts)")
    p.add_argument("--measure", nargs=2, metavar=("TRAIN_JSONL", "AUGMENT"), help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


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
    """CPU seconds spent in each part (a wrapped function adds its time to its part, not to the part around it)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._stack: list[str] = []

    def wrap(self, part: str, fn):
        def timed(*a, **k):
            t = time.process_time()
            self._stack.append(part)
            try:
                return fn(*a, **k)
            finally:
                self._stack.pop()
                dt = time.process_time() - t
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


def _pass(dset, order: list[int], collate) -> tuple[float, float]:
    """(wall, CPU) seconds to build the examples of `order` and collate them by batches of BATCH, as a
    worker does."""
    t, c, batch = time.perf_counter(), time.process_time(), []
    for k in order:
        batch.append(dset[k])
        if len(batch) == BATCH:
            collate(batch)
            batch = []
    if batch:
        collate(batch)
    return time.perf_counter() - t, time.process_time() - c


def measure(
    train_jsonl: str,
    resolution: int,
    augment: str,
    examples: int,
    loader_workers: int,
    repeat: int = 3,
) -> dict:
    """One configuration, in this (fresh) process: rate, split, peak memory (and the DataLoader rate)."""
    import torch

    torch.set_num_threads(1)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from torch.utils.data import default_collate

    from training.tokens import Tokenizer

    dset = _dataset(Path(train_jsonl), resolution, augment)
    order = [k % len(dset) for k in range(examples)]
    for k in range(len(dset) - 20, len(dset)):  # warm-up: archive handles, lazy imports
        dset[k]
    # each timed pass starts with an empty token cache: in an epoch of a real dataset every caption is
    # new to a worker (Flickr30k's 145,000 captions make ~10x more distinct texts than the cache keeps)
    wall = cpu = float("inf")
    for _ in range(repeat):
        dset.tokenizer = Tokenizer()
        w, c = _pass(dset, order, default_collate)
        wall, cpu = min(wall, w), min(cpu, c)
    clock = _Clock()
    _instrument(clock)
    split, split_total = {}, float("inf")
    for _ in range(repeat):  # the pass with the least CPU time gives the split
        clock.seconds = dict.fromkeys(PARTS, 0.0)
        dset.tokenizer = Tokenizer()
        total = _pass(dset, order, clock.wrap("collating", default_collate))[1]
        if total < split_total:
            split, split_total = dict(clock.seconds), total
    # the bound when no text repeats (real captions repeat less than the synthetic ones): clip.tokenize
    from agree.entities import prompt, training_slots
    from clip.clip import tokenize

    texts = []
    for k in order:
        r = dset.records[k]
        slots = training_slots(r.caption, r.segs)
        texts.append([r.caption, *slots.prompts, *slots.masked, prompt(r.caption.split()[-1])])
    t = time.process_time()
    for x in texts:
        tokenize(x)
    uncached = time.process_time() - t
    out = {
        "rate": examples / cpu,
        "ms": 1e3 * cpu / examples,
        "wall_rate": examples / wall,
        "split": {p: 1e3 * s / examples for p, s in split.items()},
        "split_total_ms": 1e3 * split_total / examples,
        "tokenise_uncached_ms": 1e3 * uncached / examples,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "start_mib": base_rss / 1024,
    }
    if loader_workers:
        from torch.utils.data import DataLoader

        dset = _dataset(Path(train_jsonl), resolution, augment)
        loader = DataLoader(dset, batch_size=BATCH, shuffle=True, num_workers=loader_workers)
        out["loader_rate"] = 0.0
        for _ in range(repeat):
            it = iter(loader)
            next(it)  # workers started
            t, n = time.perf_counter(), 0
            for batch in it:
                n += len(batch["image"])
            out["loader_rate"] = max(out["loader_rate"], n / (time.perf_counter() - t))
    return out


def _in_fresh_process(
    train_jsonl: Path, augment: str, args: argparse.Namespace, workers: int
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--measure",
        str(train_jsonl),
        augment,
        "--resolution",
        str(args.resolution),
        "--examples",
        str(args.examples),
        "--loader-workers",
        str(workers),
        "--repeat",
        str(args.repeat),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {train_jsonl} ({augment}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Build the data, time every configuration in a fresh process, print the table."""
    args = parse_args(argv)
    if args.measure:
        train_jsonl, augment = args.measure
        print(
            json.dumps(
                measure(
                    train_jsonl,
                    args.resolution,
                    augment,
                    args.examples,
                    args.loader_workers,
                    args.repeat,
                )
            )
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_loader.") as tmp:
        work = args.work_dir or Path(tmp)
        print(
            f"load average at the start: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs"
        )
        t = time.perf_counter()
        layouts = build_layouts(work, args.images, args.resolution)
        n_ex = sum(1 for _ in layouts[("uint8", "boxes")].train_jsonl.open())
        print(
            f"data: synthetic world, {args.images} train images ({n_ex} examples) at {args.resolution} px, "
            f"prepared 4 ways in {time.perf_counter() - t:.0f} s; {args.examples} examples timed per row, "
            "one process with one torch thread = one DataLoader worker",
            flush=True,
        )
        results = {}
        for k, (storage, masks, augment) in enumerate(CONFIGS):
            lay = layouts[(storage, masks)]
            workers = args.loader_workers if k == 0 else 0
            r = _in_fresh_process(lay.train_jsonl, augment, args, workers)
            results[(storage, masks, augment)] = r
            s = r["split"]
            other = r["split_total_ms"] - sum(s.values())
            print(
                f"{storage:>7} storage, {masks:<6} masks, augment {augment:<19}: "
                f"{r['rate']:6.1f} examples/s per worker ({r['ms']:.2f} ms of CPU per example, "
                f"{r['wall_rate']:.1f}/s by the wall clock; split: "
                + ", ".join(f"{p} {s[p]:.2f}" for p in PARTS)
                + f", other {other:.2f} ms; tokenising without cache {r['tokenise_uncached_ms']:.2f} ms); "
                f"peak memory {r['peak_mib']:.0f} MiB per worker ({r['start_mib']:.0f} MiB at start)",
                flush=True,
            )
            if "loader_rate" in r:
                print(
                    f"{'':>7} DataLoader, {args.loader_workers} worker processes, batch 32: "
                    f"{r['loader_rate']:.1f} examples/s in all",
                    flush=True,
                )
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} CPUs")
        default = results[CONFIGS[0]]["rate"]
        if args.consume:
            print(
                f"a run consuming {args.consume:g} examples/s needs {math.ceil(args.consume / default)} "
                f"worker processes at {default:.1f} examples/s per worker (default layout)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
