"""Reproduce the paper's tables by running the README's recipes: zero-shot re-ranking,
fine-tuning with and without the AGREE terms, and the ablation of each term.

Every stage is a call of one of the README's scripts with the README's flags, so the same
command runs the demo (synthetic data, tiny model, CPU) and the real thing (Flickr30k,
OpenAI's ViT-L/14, GPUs):

    python scripts/reproduce_tables.py --data-root tmp/datasets/flickr30k_images --vg-root tmp/VG \
        --pretrained tmp/pretrained_models/ViT-L-14.pt --model ViT-L-14 --device cuda --out tmp/tables

By default it reproduces the release: the ranking terms' arithmetic of the released code and its global
batch of 32 (4 GPUs x 8), on any number of GPUs. Running the same command again continues: finished
stages are skipped, a killed fine-tuning run continues from its newest checkpoint (docs/tables.md).
"""

from __future__ import annotations

import argparse

from agree.cli import HelpFormatter, add_hidden_alias, model_help
from agree.io import InputError, run_cli
from agree.layout import DATASETS, DEFAULT_DATASET, Layout
from experiments.tables import (
    RANKING,
    RECIPE_EPOCH,
    RELEASE_GLOBAL_BATCH,
    TableRunner,
    evaluated_epoch,
    fine_tune_layout,
    open_output_folder,
)


def build_parser() -> argparse.ArgumentParser:
    """Flags: data, checkpoint, model, device, and the fine-tuning recipe (README values by default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=DEFAULT_DATASET,
        help="dataset name in the layout's file names",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="dataset folder in the release layout (default: ./tmp/datasets/<dataset>_images)",
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
        help=model_help("model config of --pretrained"),
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh: delete what earlier runs of this script wrote under --out (nothing else); "
        "without it a run continues the last one, skipping the stages that finished",
    )
    p.add_argument(
        "--parts",
        default="zeroshot,finetune,ablation",
        help="comma-separated subset of zeroshot, finetune, ablation",
    )
    # Fine-tuning recipe: the README's values by default.
    p.add_argument("--epochs", type=int, default=50, help="epochs of the learning-rate schedule")
    p.add_argument(
        "--global-batch",
        type=int,
        default=RELEASE_GLOBAL_BATCH,
        help="examples per optimiser step of every fine-tuning run (default: the release's 4 GPUs x 8 = "
        f"{RELEASE_GLOBAL_BATCH}), reached whatever the number of processes with a per-process "
        "--batch-size and --accum-freq; an error if the processes cannot share it evenly",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="the largest batch per process and micro-batch (default: the release's 8 per GPU); the "
        "rest of each process's share of --global-batch is accumulated (--accum-freq)",
    )
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--wd", type=float, default=0.1, help="weight decay")
    p.add_argument("--warmup", type=int, default=10000, help="warm-up steps")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument(
        "--precision", default=None, help="amp, fp16 or fp32 (default: amp on CUDA, fp32 on CPU)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every fine-tuning run")
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
        "--ranking",
        choices=sorted(RANKING),
        default="release",
        help="the three ranking terms' gradients: 'release' (the release's arithmetic, which produced "
        "the paper's numbers: --legacy-detached-rank on every fine-tuning run) or 'described' (the "
        "paper's description: gradients through all six terms)",
    )
    p.add_argument(
        "--legacy-detached-rank",
        action="store_true",
        help="the same as --ranking release (the default)",
    )
    p.add_argument(
        "--save-every-n-steps",
        type=int,
        default=1000,
        help="passed to every fine-tuning run: checkpoints/epoch_latest.pt every N steps, from which a "
        "killed run continues (0: only at the end of each epoch); deleted when the run has finished",
    )
    p.add_argument(
        "--max-missing-fraction",
        type=float,
        default=None,
        help="passed to every fine-tuning run (default: main_all.py's, 0: any missing input is an error)",
    )
    # Evaluation recipe.
    p.add_argument(
        "--top-k", type=int, default=10, help="top-k of the plain predictions (the README's)"
    )
    p.add_argument(
        "--egr-top-k", type=int, default=20, help="top-k of the EGR predictions (the README's)"
    )
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="batch of feature extraction and of the top-k scripts; --batch-size-eval is accepted too",
    )
    add_hidden_alias(p, "--batch-size-eval", "eval_batch_size", type=int)
    p.add_argument(
        "--examples",
        type=int,
        default=4,
        help="test captions drawn in retrieval_examples.png (0 = no picture)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the flags and derive the fine-tuning layout, the evaluated epoch and the data folder."""
    args = build_parser().parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    unknown = parts - {"zeroshot", "finetune", "ablation"}
    if unknown:
        raise InputError(f"--parts: unknown part(s) {', '.join(sorted(unknown))}")
    args.parts = parts
    if args.legacy_detached_rank and args.ranking != "release":
        raise InputError("--legacy-detached-rank is --ranking release; drop one of them")
    if args.save_every_n_steps < 0:
        raise InputError(f"--save-every-n-steps must be >= 0, got {args.save_every_n_steps}")
    args.epoch = evaluated_epoch(args.epochs, args.epoch)
    args.layout = fine_tune_layout(args)
    if args.data_root is None:
        args.data_root = str(Layout.under("./tmp", args.dataset).data_dir)
    return args


def main() -> int:
    """Run the selected parts (finished stages are skipped) and write results.md / results.json."""
    args = parse_args()
    runner = TableRunner(args, open_output_folder(args.out, args.overwrite))
    print(
        f"fine-tuning: global batch {args.layout.global_batch} = {args.layout.describe()}; "
        f"ranking terms: {args.ranking}",
        flush=True,
    )
    runner.run_parts(sorted(args.parts, key=["zeroshot", "finetune", "ablation"].index))
    runner.write_results()
    if args.examples and "zeroshot" in args.parts:
        runner.draw_examples(args.examples)
    print(runner.markdown())
    return 0


if __name__ == "__main__":
    run_cli(main)
