"""Benchmark of scripts/prepare_data.py: images per second and peak memory on generated Flickr30k-sized JPEGs.

    python scripts/bench_prepare.py [--images 1000] [--resolution 224] [--workers N] [--storage float32 uint8]

Writes a raw Flickr30k (500x375 JPEGs at quality 92, ~120 KiB each like the real ones, Karpathy
split file, Flickr30k Entities sentence and box files for every image, so each training image also
gets its grounding-masked copies) and a small Visual Genome into a temporary folder, then times each
preparation in a fresh process: the dataset stage's images/s (decode, resize + crop, masks,
writing), the whole run's wall time, the CPU time per image of all its processes (main + workers,
the VG stage included, start-up excluded) and the images/s that this CPU time allows on idle cores
(a figure that a loaded machine does not distort much), and the peak resident memory of the main
process and of the largest worker. Generation is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from agree.cli import HelpFormatter

WORDS = ["man", "woman", "dog", "shirt", "ball", "car", "tree", "hat", "bike", "boat"]


def _photo(rng: np.random.Generator, w: int, h: int, boxes: list) -> Image.Image:
    """A photo-like picture: smooth colour fields, texture noise and a few flat objects."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.005, 0.03, size=(3, 2))
    img = np.stack([128 + 60 * np.sin(xx * f[c, 0] + yy * f[c, 1] + c) for c in range(3)], -1)
    img += rng.normal(0, 25, size=img.shape)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_raw(root: Path, n: int, n_vg: int = 200, seed: int = 0) -> None:
    """A raw Flickr30k of `n` images (90% train, 5% val, 5% test) with Entities files, and a small Visual Genome."""
    rng = np.random.default_rng(seed)
    images, sentences, annotations = (
        root / "raw/flickr30k-images",
        root / "raw/flickr30k_entities/Sentences",
        root / "raw/flickr30k_entities/Annotations",
    )
    for d in (images, sentences, annotations, root / "vg/VG_100K"):
        d.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n):
        stem = str(1000000 + k)
        w, h = (500, 375) if k % 4 else (375, 500)
        boxes = []
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
            boxes.append(
                (x0, y0, x0 + int(rng.integers(40, w // 2)), y0 + int(rng.integers(40, h // 2)))
            )
        _photo(rng, w, h, boxes).save(images / f"{stem}.jpg", quality=92)
        words = [WORDS[int(i)] for i in rng.choice(len(WORDS), 3, replace=False)]
        raw = [f"A {words[0]} with a {words[1]} near a {words[2]}." for _ in range(5)]
        marked = [
            f"[/EN#{3 * k + 1}/people A {words[0]}] with [/EN#{3 * k + 2}/other a {words[1]}] near "
            f"[/EN#{3 * k + 3}/other a {words[2]}] ."
            for _ in range(5)
        ]
        (sentences / f"{stem}.txt").write_text("\n".join(marked) + "\n")
        objs = "".join(
            f"<object><name>{3 * k + 1 + j}</name><bndbox><xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for j, b in enumerate(boxes)
        )
        (annotations / f"{stem}.xml").write_text(
            f"<annotation><size><width>{w}</width><height>{h}</height></size>{objs}</annotation>"
        )
        split = "train" if k % 20 < 18 else ("val" if k % 20 == 18 else "test")
        records.append(
            {
                "filename": f"{stem}.jpg",
                "imgid": k,
                "split": split,
                "sentences": [{"raw": r, "sentid": 5 * k + j} for j, r in enumerate(raw)],
            }
        )
    (root / "raw/dataset_flickr30k.json").write_text(json.dumps({"images": records}))
    data, objects = [], []
    for g in range(1, n_vg + 1):
        _photo(rng, 500, 333, []).save(root / f"vg/VG_100K/{g}.jpg", quality=90)
        data.append({"image_id": g, "width": 500, "height": 333, "url": f"x/VG_100K/{g}.jpg"})
        objects.append(
            {
                "image_id": g,
                "objects": [
                    {"x": 100, "y": 80, "w": 200, "h": 150, "names": [WORDS[g % len(WORDS)]]}
                ],
            }
        )
    (root / "vg/image_data.json").write_text(json.dumps(data))
    (root / "vg/objects.json").write_text(json.dumps(objects))


class WorkerPeaks(threading.Thread):
    """Samples the peak resident memory (VmHWM, Linux /proc) of this process's child processes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib, self.done = 0, threading.Event()

    def _scan(self) -> None:
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("PPid", "").strip() == me and "VmHWM" in fields:
                self.peak_kib = max(self.peak_kib, int(fields["VmHWM"].split()[0]))

    def run(self) -> None:
        while not self.done.wait(0.2):
            self._scan()


def measure(args: argparse.Namespace) -> None:
    """(child process) run one preparation and print its timings and peak memory as JSON."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    args.cpu_before = (
        own.ru_utime + own.ru_stime
    )  # interpreter start-up and imports are not counted
    from dataprep.pipeline import PrepareConfig, prepare

    root = Path(args.root)
    peaks = WorkerPeaks()
    if Path("/proc/self/status").is_file():
        peaks.start()
    start = time.perf_counter()
    report = prepare(
        PrepareConfig(
            "flickr30k",
            root / "raw",
            root / "vg",
            Path(args.out),
            resolution=args.resolution,
            storage=args.storage[0],
            workers=args.workers,
            progress=False,
            log=lambda _: None,
            vg_per_word=args.vg_per_word,
        )
    )
    wall = time.perf_counter() - start
    peaks.done.set()
    mb = 1024.0  # KiB -> MiB (ru_maxrss is in KiB on Linux)
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime - args.cpu_before
    print(
        json.dumps(
            {
                "seconds": report.seconds,
                "wall": wall,
                "counts": report.counts,
                "cpu": cpu,
                "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / mb,
                "worker_peak_mb": peaks.peak_kib / mb if peaks.peak_kib else None,
            }
        )
    )


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="Flickr30k-sized JPEGs generated")
    p.add_argument("--resolution", type=int, default=224, help="prepare_data.py --resolution")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="prepare_data.py --workers (default: one per CPU)",
    )
    p.add_argument(
        "--storage",
        nargs="+",
        default=["float32", "uint8"],
        choices=["float32", "uint8"],
        help="the storages timed, one preparation each",
    )
    p.add_argument("--vg-per-word", type=int, default=10, help="prepare_data.py --vg-per-word")
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.measure:
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_prepare.") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_raw(root, args.images)
        size = sum(f.stat().st_size for f in (root / "raw/flickr30k-images").iterdir())
        print(
            f"generated {args.images} JPEGs ({size / args.images / 1024:.0f} KiB each) in "
            f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs, --workers {args.workers}, "
            f"--resolution {args.resolution}"
        )
        cpus = os.cpu_count() or 1
        print(
            f"| storage | dataset images/s | dataset stage | whole run | CPU time per image | images/s if CPU-bound on "
            f"{cpus} idle cores | output | peak memory (main / largest worker) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for storage in args.storage:
            out = root / f"out_{storage}"
            cmd = [
                sys.executable,
                __file__,
                "--measure",
                "--root",
                str(root),
                "--out",
                str(out),
                "--storage",
                storage,
                "--resolution",
                str(args.resolution),
                "--workers",
                str(args.workers),
                "--vg-per-word",
                str(args.vg_per_word),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
            s = r["seconds"]
            worker = "n/a" if r["worker_peak_mb"] is None else f"{r['worker_peak_mb']:.0f} MiB"
            per_image = r["cpu"] / args.images
            print(
                f"| {storage} | {s['dataset images/s']:.0f} | {s['dataset images']:.1f} s | {r['wall']:.1f} s | "
                f"{per_image * 1e3:.1f} ms | {cpus / per_image:.0f} | {written:.0f} MiB | "
                f"{r['main_peak_mb']:.0f} MiB / {worker} |"
            )


if __name__ == "__main__":
    main()
