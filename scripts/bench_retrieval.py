"""Benchmark first-stage retrieval over a large gallery against FAISS (prints numbers; not a test).

Synthetic features (random unit vectors, default 100,000 items x 25,000 queries, 768-d, float32)
are generated in each child process from the same seed; each method then searches the exact top-k
by inner product in a fresh child process, so that its wall time and peak resident memory
(ru_maxrss) are its own:

- `numpy`: eval/topk.py's chunked_topk on numpy (what make_topk_predictions.py runs with --device cpu);
- `faiss`: FAISS's exact inner-product index, IndexFlatIP (faiss-cpu), items added block by block.

Both directions are timed: `t2i` (the queries search the items) and `i2t` (the items search the
queries). The top-k lists of the methods are compared row by row; where they differ the score gap
at the differing places is printed (a tie or a difference in the last float bits).

    python3 scripts/bench_retrieval.py                     # full scale (several minutes)
    python3 scripts/bench_retrieval.py --items 20000 --queries 5000 --dim 64
    python3 scripts/bench_retrieval.py --chain             # the README's chain scripts at that scale
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agree.cli import HelpFormatter
from agree.io import run_cli
from agree.ownership import OutputFolder

ROOT = Path(__file__).resolve().parents[1]
OWNER = "scripts/bench_retrieval.py"
SCRATCH = (
    "files"  # --workdir's sub-folder holding the generated files (claimed, deleted at the end)
)


def _work(args: argparse.Namespace) -> Path:
    """Where the generated files go: --workdir/files/ (the parent claims it before any child writes)."""
    return Path(args.workdir) / SCRATCH


GEN_BLOCK = 8192  # rows generated (and added to FAISS) at a time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--items", type=int, default=100_000, help="gallery size (e.g. images)")
    p.add_argument("--queries", type=int, default=25_000, help="queries (e.g. captions)")
    p.add_argument("--dim", type=int, default=768, help="feature dimension (ViT-L/14's 768)")
    p.add_argument("--top-k", type=int, default=10, help="items kept per query")
    p.add_argument(
        "--eval-batch-size", type=int, default=256, help="queries scored at once by chunked_topk"
    )
    p.add_argument("--methods", default="numpy,faiss", help="comma-separated: numpy, faiss")
    p.add_argument("--directions", default="t2i,i2t", help="comma-separated: t2i, i2t")
    p.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated features")
    p.add_argument(
        "--workdir",
        default=str(ROOT / "tmp" / "bench_retrieval"),
        help="the generated files go to its sub-folder files/ (deleted at the end"
        + (" unless --keep" if "bench_retrieval" == "bench" else "")
        + "); nothing else in it is touched",
    )
    p.add_argument(
        "--chain",
        action="store_true",
        help="instead: write the features as .npy files (items = images, queries = captions, plus "
        "--slots prompt and mask slots per caption) and time the README's chain scripts on them",
    )
    p.add_argument("--slots", type=int, default=10, help="entity slots per caption (--chain)")
    p.add_argument("--internal", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """n random unit vectors, float32."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def blocks(n: int, dim: int, seed: int):
    """The synthetic matrix as a sequence of row blocks (same values however they are stored)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, GEN_BLOCK):
        yield unit_rows(rng, min(GEN_BLOCK, n - start), dim)


def matrix(n: int, dim: int, seed: int) -> np.ndarray:
    """The synthetic matrix in one array (filled block by block: no second copy)."""
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for b in blocks(n, dim, seed):
        out[start : start + len(b)] = b
        start += len(b)
    return out


def child(args: argparse.Namespace) -> int:
    """Run one method in this process and print {seconds} as JSON; results go to the workdir."""
    method, direction = args.internal.split(":")
    sizes = {"items": (args.items, args.seed), "queries": (args.queries, args.seed + 1)}
    q_name, i_name = ("queries", "items") if direction == "t2i" else ("items", "queries")
    n_queries, queries_seed = sizes[q_name]
    n_items, items_seed = sizes[i_name]
    queries = matrix(n_queries, args.dim, queries_seed)
    if method == "none":  # the features alone: the baseline memory of every method
        items = matrix(n_items, args.dim, items_seed)
        print(json.dumps({"seconds": 0.0}))
        return 0
    if method == "faiss":
        import faiss

        index = faiss.IndexFlatIP(args.dim)
        for b in blocks(
            n_items, args.dim, items_seed
        ):  # the index holds the only copy of the items
            index.add(b)
        t0 = time.perf_counter()
        s, i = index.search(queries, args.top_k)
        seconds = time.perf_counter() - t0
        order = np.lexsort((i, -s), axis=1)  # list ties by ascending index, as chunked_topk does
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    elif method == "numpy":
        from eval.array_ops import NumpyOps
        from eval.topk import chunked_topk

        items = matrix(n_items, args.dim, items_seed)
        t0 = time.perf_counter()
        parts = list(chunked_topk(NumpyOps(), queries, items, args.top_k, args.eval_batch_size))
        seconds = time.perf_counter() - t0
        s = np.concatenate([p[1] for p in parts])
        i = np.concatenate([p[2] for p in parts])
    else:
        raise SystemExit(f"unknown method {method!r}")
    work = _work(args)
    np.save(work / f"{method}_{direction}_scores.npy", s)
    np.save(work / f"{method}_{direction}_ids.npy", i.astype(np.int64))
    print(json.dumps({"seconds": seconds}))
    return 0


def write_chain_files(args: argparse.Namespace) -> int:
    """Features for --chain: images, captions near an image each, their slots; ground truth both ways."""
    from agree.io import write_jsonl
    from eval.feature_io import FeatureWriter

    work = _work(args)
    rng = np.random.default_rng(args.seed)
    n_img, n_txt, d, s = args.items, args.queries, args.dim, args.slots
    img = matrix(n_img, d, args.seed)
    owner = np.arange(n_txt) % n_img
    img_ids = [str(i) for i in range(n_img)]
    with FeatureWriter(work / "img.npy", "image_id") as w:
        w.add(img_ids, img)
    with contextlib.ExitStack() as files:
        txt_w = files.enter_context(FeatureWriter(work / "txt.npy", "query_id"))
        slot_w = [
            files.enter_context(FeatureWriter(work / f"{n}.npy", "query_id", slots=True))
            for n in ("prompt", "mask")
        ]
        for q0 in range(0, n_txt, GEN_BLOCK):
            own = owner[q0 : q0 + GEN_BLOCK]
            txt = img[own] + 1.5 * rng.standard_normal((len(own), d), dtype=np.float32) / np.sqrt(d)
            txt /= np.linalg.norm(txt, axis=1, keepdims=True)
            ids = list(range(q0, q0 + len(own)))
            txt_w.add(ids, txt)
            for w in slot_w:
                slots = txt[:, None] + rng.standard_normal(
                    (len(own), s, d), dtype=np.float32
                ) / np.sqrt(d)
                w.add(ids, slots / np.linalg.norm(slots, axis=-1, keepdims=True))
    write_jsonl(
        work / "gt_texts.jsonl",
        ({"query_id": q, "item_ids": [int(owner[q])]} for q in range(n_txt)),
    )
    write_jsonl(
        work / "gt_images.jsonl",
        ({"image_id": i, "item_ids": np.flatnonzero(owner == i).tolist()} for i in range(n_img)),
    )
    return 0


def run_chain(args: argparse.Namespace, me: list[str]) -> int:
    """Time the README's chain scripts on --chain files, each in a fresh process."""
    work = _work(args)
    subprocess.run(me + ["--internal", "chain-files"], check=True)
    py = [sys.executable, "-u"]
    feats = [
        f"--image-feats={work / 'img.npy'}",
        f"--text-feats={work / 'txt.npy'}",
        "--device=cpu",
        f"--eval-batch-size={args.eval_batch_size}",
    ]
    stages = [
        (
            "plain top-k, both directions (make_topk_predictions.py --top-k=10)",
            py
            + [
                "eval/make_topk_predictions.py",
                *feats,
                "--top-k=10",
                f"--output-images={work / 'i.jsonl'}",
                f"--output-texts={work / 't.jsonl'}",
            ],
        ),
        (
            "EGR, both directions (make_topk_predictions_mask+prompt.py --top-k=20, pool 128)",
            py
            + [
                "eval/make_topk_predictions_mask+prompt.py",
                *feats,
                f"--mask-feats={work / 'mask.npy'}",
                f"--prompt-feats={work / 'prompt.npy'}",
                "--top-k=20",
                f"--output-images={work / 'im.jsonl'}",
                f"--output-texts={work / 'tm.jsonl'}",
            ],
        ),
        (
            "TBR (eval_back_retrieval.py)",
            py
            + [
                "eval/eval_back_retrieval.py",
                str(work / "gt_images.jsonl"),
                str(work / "im.jsonl"),
                str(work / "gt_texts.jsonl"),
                str(work / "tm.jsonl"),
                str(work / "ir.jsonl"),
                str(work / "tr.jsonl"),
            ],
        ),
        (
            "evaluation.py (texts)",
            py
            + [
                "eval/evaluation.py",
                str(work / "gt_texts.jsonl"),
                str(work / "tr.jsonl"),
                str(work / "s.json"),
                "query_id",
            ],
        ),
    ]
    print(
        f"chain on {args.items} images x {args.queries} captions, {args.dim}-d, {args.slots}+{args.slots} slots "
        f"(binary features); load average {os.getloadavg()[0]:.1f} at start"
    )
    print("\n| stage | wall s | peak RSS MB |\n|---|---:|---:|")
    for name, cmd in stages:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr.read().decode()}")
        print(
            f"| {name} | {time.perf_counter() - t0:.1f} | {usage.ru_maxrss / 1024:.0f} |",
            flush=True,
        )
    sizes = sum(p.stat().st_size for p in work.glob("*.npy")) / 2**20
    print(
        f"(feature files: {sizes:.0f} MB in all; load average {os.getloadavg()[0]:.1f} at the end)"
    )
    OutputFolder(args.workdir, OWNER).remove_owned()
    return 0


def run_child(me: list[str], job: str) -> tuple[float, float, float]:
    """(search seconds, process wall seconds, peak RSS MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        me + ["--internal", job], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{job} failed:\n{err}")
    return json.loads(out.strip().splitlines()[-1])["seconds"], wall, usage.ru_maxrss / 1024


def compare(work: Path, direction: str, a: str, b: str) -> str:
    """Rows whose top-k lists differ between methods a and b, with the score gaps that explain it."""
    ia, ib = (np.load(work / f"{m}_{direction}_ids.npy") for m in (a, b))
    sa, sb = (np.load(work / f"{m}_{direction}_scores.npy") for m in (a, b))
    differ = (ia != ib).any(axis=1)
    if not differ.any():
        return f"identical top-{ia.shape[1]} lists for all {len(ia)} queries"
    rows = np.flatnonzero(differ)
    # at a place where the lists hold different items, the two scores are those items' scores
    gap = float(np.abs(sa - sb)[ia != ib].max())
    return (
        f"{len(rows)} of {len(ia)} lists differ (rows {rows[:5].tolist()}); the items that differ score within "
        f"{gap:.1e} of each other (float32 rounding); e.g. {ia[rows[0]].tolist()} vs {ib[rows[0]].tolist()}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.internal == "chain-files":
        return write_chain_files(args)
    if args.internal:
        return child(args)
    work = _work(args)
    work = OutputFolder(args.workdir, OWNER).scratch(SCRATCH)  # refused if foreign
    me = [sys.executable, "-u", str(Path(__file__).resolve())] + list(
        argv if argv is not None else sys.argv[1:]
    )
    if args.chain:
        return run_chain(args, me)
    methods = [m for m in args.methods.split(",") if m]
    directions = [d for d in args.directions.split(",") if d]
    print(
        f"{args.items} items x {args.queries} queries, {args.dim}-d float32, top-{args.top_k}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start"
    )
    rows = []
    for direction in directions:
        _, _, base_mem = run_child(me, f"none:{direction}")
        for method in methods:
            best = min(
                (run_child(me, f"{method}:{direction}") for _ in range(args.repeat)),
                key=lambda r: r[0],
            )
            rows.append((direction, method, best[0], best[2], base_mem))
            print(
                f"  {direction} {method}: {best[0]:.2f} s search, peak RSS {best[2]:.0f} MB",
                flush=True,
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    n_q = {"t2i": args.queries, "i2t": args.items}
    n_i = {"t2i": args.items, "i2t": args.queries}
    print(
        "\n| direction | method | search s | peak RSS MB | RSS above the features MB "
        "| time vs FAISS | memory vs FAISS |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    ref = {(d, m): (t, mem) for d, m, t, mem, _ in rows}
    for d, m, t, mem, base in rows:
        f = ref.get((d, "faiss"))
        ratio_t = f"{t / f[0]:.2f}x" if f else ""
        ratio_m = f"{mem / f[1]:.2f}x" if f else ""
        print(
            f"| {d} ({n_q[d]:,} queries x {n_i[d]:,} items) | {m} | {t:.2f} | {mem:.0f} | {mem - base:.0f} | "
            f"{ratio_t} | {ratio_m} |"
        )
    if "numpy" in methods and "faiss" in methods:
        for d in directions:
            print(f"{d}: numpy vs faiss: {compare(work, d, 'numpy', 'faiss')}")
    OutputFolder(args.workdir, OWNER).remove_owned()
    return 0


if __name__ == "__main__":
    run_cli(main)
