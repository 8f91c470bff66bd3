"""Reproduce the paper's tables by running the README's recipes: zero-shot re-ranking,
fine-tuning with and without the AGREE terms, and the ablation of each term.

Every stage is a call of one of the README's scripts with the README's flags, so the same
command runs the demo (synthetic data, tiny model, CPU) and the real thing (Flickr30k,
OpenAI's ViT-L/14, GPUs):

    python scripts/reproduce_tables.py --data-root tmp/datasets/flickr30k_images --vg-root tmp/VG \
        --pretrained tmp/pretrained_models/ViT-L-14.pt --model ViT-L-14 --device cuda --out tmp/tables
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from agree.io import InputError, run_cli
from agree.layout import DATASETS, DEFAULT_DATASET, Layout
from experiments.tables import RECIPE_EPOCH, TableRunner, ablation_configs, evaluated_epoch
from training.terms import AGREE_TERMS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: data, checkpoint, model, device, and the fine-tuning recipe (README values by default)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=DEFAULT_DATASET,
        help="dataset name in the layout's file names",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset folder in the release layout (default ./tmp/datasets/<dataset>_images)",
    )
    p.add_argument("--vg-root", default="./tmp/VG", help="Visual Genome entity data folder")
    p.add_argument(
        "--pretrained",
        default="./tmp/pretrained_models/ViT-L-14.pt",
        help="the pre-trained CLIP checkpoint (zero-shot model and fine-tuning start)",
    )
    p.add_argument(
        "--model",
        default="ViT-L-14",
        help="model config name: ViT-L-14, ViT-B-32, RN50, tiny (OpenAI's, QuickGELU) or ViT-L-14-gelu, "
        "ViT-B-32-gelu, RN50-gelu (OpenCLIP's GELU checkpoints)",
    )
    p.add_argument(
        "--jit",
        action="store_true",
        help="read a TorchScript --pretrained with torch.jit.load (runs the archive's code)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--out",
        default="./tmp/tables",
        help="where predictions, runs, results.md and results.json go",
    )
    p.add_argument("--overwrite", action="store_true", help="delete --out first if it exists")
    p.add_argument(
        "--parts",
        default="zeroshot,finetune,ablation",
        help="comma-separated subset of zeroshot, finetune, ablation",
    )
    # Fine-tuning recipe: the README's values by default.
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=10000)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument(
        "--precision", default=None, help="amp, fp16 or fp32 (default: amp on CUDA, fp32 on CPU)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--epoch",
        type=int,
        default=None,
        help=f"the fine-tuned checkpoint evaluated, epoch_N.pt (default: the recipe's epoch_{RECIPE_EPOCH}.pt "
        "when --epochs reaches it, else the last); training stops after it, on the --epochs schedule",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="worker processes per fine-tuning run, passed to main_all.py --nproc (default: main_all.py's, "
        "one per visible GPU as in the release, one on the CPU)",
    )
    p.add_argument(
        "--legacy-detached-rank",
        action="store_true",
        help="passed to every fine-tuning run: the released code's gradients of the ranking terms",
    )
    p.add_argument(
        "--max-missing-fraction",
        type=float,
        default=None,
        help="passed to every fine-tuning run (default: main_all.py's, 0: any missing input is an error)",
    )
    # Evaluation recipe.
    p.add_argument(
        "--top-k", type=int, default=10, help="top-k of the plain predictions (README: 10)"
    )
    p.add_argument(
        "--egr-top-k", type=int, default=20, help="top-k of the EGR predictions (README: 20)"
    )
    p.add_argument("--batch-size-eval", type=int, default=32, help="--img/--text/--eval-batch-size")
    p.add_argument(
        "--examples",
        type=int,
        default=4,
        help="test captions drawn in retrieval_examples.png (0 = no picture)",
    )
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    unknown = parts - {"zeroshot", "finetune", "ablation"}
    if unknown:
        raise InputError(f"--parts: unknown part(s) {', '.join(sorted(unknown))}")
    args.parts = parts
    args.epoch = evaluated_epoch(args.epochs, args.epoch)
    if args.data_root is None:
        args.data_root = str(Layout.under("./tmp", args.dataset).data_dir)
    return args


def main() -> int:
    """Run the selected parts and write results.md / results.json."""
    args = parse_args()
    out = Path(args.out)
    if out.exists():
        if not args.overwrite:
            raise InputError(f"--out {out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    runner = TableRunner(args)
    if "zeroshot" in args.parts:
        runner.zero_shot()
    if "finetune" in args.parts:
        runner.fine_tuned("CLIP (global loss only)", ())
        runner.fine_tuned("AGREE (all terms)", AGREE_TERMS)
    if "ablation" in args.parts:
        for label, terms in ablation_configs():
            runner.fine_tuned(label, terms, tbr=False)
    runner.write_results()
    if args.examples and "zeroshot" in args.parts:
        runner.draw_examples(args.examples)
    print(runner.markdown())
    return 0


if __name__ == "__main__":
    run_cli(main)
