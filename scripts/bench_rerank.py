"""Benchmark the evaluation chain at Flickr30k scale (prints numbers; not a test).

Generates synthetic features (default 1,000 images x 5,000 captions, 768-d,
10 prompt + 10 mask slots per caption, "" pads as the release pads them) and
ground truth, writes them as JSONL and in the binary format, then times every
stage as the README runs it (a fresh `python3 -u eval/...` process each, wall
time, CPU time and peak resident memory of that process), plus the EGR compute
alone with the features already in memory. The re-ranking scripts run on numpy
(`--device cpu`, their default): none of them imports torch.

    python3 scripts/bench_rerank.py                  # full scale, files under tmp/bench/
    python3 scripts/bench_rerank.py --images 100 --captions 500 --dim 64
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from agree.cli import HelpFormatter
from agree.io import run_cli, write_jsonl
from agree.ownership import OutputFolder
from eval.feature_io import FeatureWriter

ROOT = Path(__file__).resolve().parents[1]
OWNER = "scripts/bench_rerank.py"
SCRATCH = (
    "files"  # --workdir's sub-folder holding the generated files (claimed, deleted at the end)
)


def _work(args: argparse.Namespace) -> Path:
    """Where the generated files go: --workdir/files/ (the parent claims it before any child writes)."""
    return Path(args.workdir) / SCRATCH


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="test images (Flickr30k's 1,000)")
    p.add_argument(
        "--captions", type=int, default=5000, help="total captions (spread evenly over the images)"
    )
    p.add_argument("--dim", type=int, default=768, help="feature dimension (ViT-L/14's 768)")
    p.add_argument("--slots", type=int, default=10, help="prompt slots = mask slots per caption")
    p.add_argument("--top-k", type=int, default=20, help="EGR top-k (the zero-shot recipe's 20)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="the recipes' 32")
    p.add_argument(
        "--workdir",
        default=str(ROOT / "tmp" / "bench"),
        help="the generated files go to its sub-folder files/ (deleted at the end"
        + (" unless --keep" if "bench" == "bench" else "")
        + "); nothing else in it is touched",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated features")
    p.add_argument("--repeat", type=int, default=1, help="runs per stage; the fastest is reported")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="use the files a --keep run left in --workdir (same sizes)",
    )
    p.add_argument("--internal", choices=["generate", "egr-in-memory"], help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def generate(args: argparse.Namespace, work: Path) -> int:
    """Features with retrieval structure: captions near their image, real slots near their caption."""
    rng = np.random.default_rng(args.seed)
    n_img, n_txt, d, s = args.images, args.captions, args.dim, args.slots

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    img = unit(rng.standard_normal((n_img, d)))
    owner = np.arange(n_txt) * n_img // n_txt  # caption -> image
    txt = unit(img[owner] + 1.5 * rng.standard_normal((n_txt, d)) / np.sqrt(d))
    n_real = rng.integers(1, 6, size=n_txt)  # Flickr30k captions: a handful of noun phrases
    pad = unit(rng.standard_normal(d))  # every "" slot has the same feature
    slot_sets = []
    for _ in ("prompt", "mask"):
        real = unit(txt[:, None] + rng.standard_normal((n_txt, s, d)) / np.sqrt(d))
        slot_sets.append(np.where(np.arange(s)[None, :, None] < n_real[:, None, None], real, pad))
    img_ids = [str(1_000_000 + i) for i in range(n_img)]  # strings, as npz keys
    txt_ids = list(range(n_txt))
    for ext in ("jsonl", "npy"):
        for name, key, ids, data, slots in (
            ("img_feat", "image_id", img_ids, img, False),
            ("txt_feat", "query_id", txt_ids, txt, False),
            ("prompt_feat", "query_id", txt_ids, slot_sets[0], True),
            ("mask_feat", "query_id", txt_ids, slot_sets[1], True),
        ):
            with FeatureWriter(work / f"{name}.{ext}", key, slots) as w:
                for i0 in range(0, len(ids), 1000):
                    w.add(
                        ids[i0 : i0 + 1000],
                        data[i0 : i0 + 1000],
                        n_real[i0 : i0 + 1000] if slots else None,
                    )
    write_jsonl(
        work / "test_texts.jsonl",
        ({"query_id": q, "item_ids": [int(img_ids[owner[q]])]} for q in txt_ids),
    )
    write_jsonl(
        work / "test_images.jsonl",
        (
            {"image_id": int(img_ids[i]), "item_ids": np.flatnonzero(owner == i).tolist()}
            for i in range(n_img)
        ),
    )
    return 0


def run_stage(cmd: list[str], repeat: int) -> tuple[float, float, float]:
    """(best wall seconds, CPU seconds and peak RSS in MB of that run) of a command run `repeat` times."""
    best_t, best_cpu, best_mem = float("inf"), 0.0, 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode()
        if proc.returncode != 0:
            raise SystemExit(f"stage failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
        if elapsed < best_t:  # ru_maxrss is in KB on Linux
            best_t, best_cpu, best_mem = (
                elapsed,
                usage.ru_utime + usage.ru_stime,
                usage.ru_maxrss / 1024,
            )
    return best_t, best_cpu, best_mem


def egr_in_memory(args: argparse.Namespace, work: Path) -> int:
    """Print the seconds EGR takes both ways with features already loaded (best of --repeat, min 2)."""
    from eval.array_ops import NumpyOps
    from eval.egr import egr_lists
    from eval.feature_io import read_retrieval_features, read_slot_features

    image, text = read_retrieval_features(work / "img_feat.npy", work / "txt_feat.npy")
    prompt, mask = (
        read_slot_features(work / "prompt_feat.npy", text),
        read_slot_features(work / "mask_feat.npy", text),
    )
    best = float("inf")
    for _ in range(max(2, args.repeat)):
        t0 = time.perf_counter()
        egr_lists(NumpyOps(), text, image, prompt, mask, args.top_k, args.eval_batch_size)
        best = min(best, time.perf_counter() - t0)
    print(best)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    work = _work(args)
    if args.internal == "generate":
        return generate(args, work)
    if args.internal == "egr-in-memory":
        return egr_in_memory(args, work)
    # Heavy work runs in child processes: Linux reports a child's peak RSS as at least the
    # parent's at fork time, so this process stays small for the memory figures to mean anything.
    work = OutputFolder(args.workdir, OWNER).scratch(SCRATCH)  # refused if foreign
    py = [sys.executable, "-u"]
    me = (
        py
        + [str(Path(__file__).resolve())]
        + [a for a in (argv if argv is not None else sys.argv[1:])]
    )
    t0 = time.perf_counter()
    if not (args.reuse and (work / "test_images.jsonl").is_file()):
        subprocess.run(me + ["--internal", "generate"], check=True)
    sizes = {
        p.name: p.stat().st_size / 2**20 for p in work.iterdir() if p.suffix in (".jsonl", ".npy")
    }
    print(
        f"{'reused' if args.reuse else 'generated'} {args.images} images x {args.captions} captions, "
        f"{args.dim}-d, {args.slots}+{args.slots} slots "
        f"in {time.perf_counter() - t0:.1f} s; slot files {sizes['prompt_feat.jsonl']:.0f} MB JSONL / "
        f"{sizes['prompt_feat.npy']:.0f} MB .npy each"
    )
    results = []
    for ext in ("jsonl", "npy"):
        feats = {
            n: str(work / f"{n}.{ext}")
            for n in ("img_feat", "txt_feat", "prompt_feat", "mask_feat")
        }
        out = work / f"out_{ext}"
        common = [
            f"--image-feats={feats['img_feat']}",
            f"--text-feats={feats['txt_feat']}",
            f"--eval-batch-size={args.eval_batch_size}",
            "--device=cpu",
        ]
        stages = [
            (
                "EGR (make_topk_predictions_mask+prompt)",
                py
                + [
                    "eval/make_topk_predictions_mask+prompt.py",
                    *common,
                    f"--mask-feats={feats['mask_feat']}",
                    f"--prompt-feats={feats['prompt_feat']}",
                    f"--top-k={args.top_k}",
                    f"--output-images={out}/images_mp.jsonl",
                    f"--output-texts={out}/texts_mp.jsonl",
                ],
            ),
            (
                "TBR (eval_back_retrieval)",
                py
                + [
                    "eval/eval_back_retrieval.py",
                    str(work / "test_images.jsonl"),
                    f"{out}/images_mp.jsonl",
                    str(work / "test_texts.jsonl"),
                    f"{out}/texts_mp.jsonl",
                    f"{out}/images_mp_rerank.jsonl",
                    f"{out}/texts_mp_rerank.jsonl",
                ],
            ),
            (
                "evaluation (texts)",
                py
                + [
                    "eval/evaluation.py",
                    str(work / "test_texts.jsonl"),
                    f"{out}/texts_mp_rerank.jsonl",
                    f"{out}/score_texts.json",
                    "query_id",
                ],
            ),
            (
                "evaluation (images)",
                py
                + [
                    "eval/evaluation.py",
                    str(work / "test_images.jsonl"),
                    f"{out}/images_mp_rerank.jsonl",
                    f"{out}/score_images.json",
                    "image_id",
                ],
            ),
            (
                "plain top-k (make_topk_predictions)",
                py
                + [
                    "eval/make_topk_predictions.py",
                    *common,
                    "--top-k=10",
                    f"--output-images={out}/images.jsonl",
                    f"--output-texts={out}/texts.jsonl",
                ],
            ),
        ]
        chain_t, chain_cpu, chain_mem = 0.0, 0.0, 0.0
        for name, cmd in stages:
            t, cpu, mem = run_stage(cmd, args.repeat)
            results.append((ext, name, t, cpu, mem))
            if not name.startswith("plain"):
                chain_t, chain_cpu, chain_mem = chain_t + t, chain_cpu + cpu, max(chain_mem, mem)
        results.append(
            (ext, "zero-shot chain (EGR + TBR + 2 x evaluation)", chain_t, chain_cpu, chain_mem)
        )
    egr_t = float(
        subprocess.run(
            me + ["--internal", "egr-in-memory"], check=True, capture_output=True, text=True
        ).stdout.split()[-1]
    )
    t_import = min(run_stage(py + ["-c", "import numpy"], 1)[:2] for _ in range(3))

    print("\n| features | stage | wall s | CPU s | peak RSS MB |\n|---|---|---:|---:|---:|")
    for ext, name, t, cpu, mem in results:
        print(
            f"| {'JSONL' if ext == 'jsonl' else 'binary .npy'} | {name} | {t:.2f} | {cpu:.2f} | {mem:.0f} |"
        )
    print(f"| in memory | EGR compute both ways (no file I/O) | {egr_t:.2f} | | |")
    print(
        f"| - | python -c 'import numpy' (interpreter start-up) | {t_import[0]:.2f} | {t_import[1]:.2f} | |"
    )
    if not args.keep:
        OutputFolder(args.workdir, OWNER).remove_owned()
    return 0


if __name__ == "__main__":
    run_cli(main)
