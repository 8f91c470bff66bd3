"""Command-line flags shared by several eval scripts (defined once)."""

from __future__ import annotations

import argparse

from agree.cli import HelpFormatter, model_help
from agree.precision import PRECISIONS


def script_parser(description: str) -> argparse.ArgumentParser:
    """An eval script's parser: its module docstring as description, the project's help format."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_prediction_args(p: argparse.ArgumentParser) -> None:
    """Flags of make_topk_predictions.py, shared with make_topk_predictions_mask+prompt.py."""
    p.add_argument(
        "--image-feats", required=True, help="image features (.jsonl, or .npy + .ids.json)"
    )
    p.add_argument(
        "--text-feats", required=True, help="text features (.jsonl, or .npy + .ids.json)"
    )
    p.add_argument("--top-k", type=int, default=10, help="items kept per query")
    p.add_argument(
        "--eval-batch-size", type=int, default=256, help="queries scored at once (bounds memory)"
    )
    p.add_argument(
        "--output-images", required=True, help="I2T predictions to write (keyed by image_id)"
    )
    p.add_argument(
        "--output-texts", required=True, help="T2I predictions to write (keyed by query_id)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (numpy; torch is not imported), cuda or cuda:N (torch), auto (cuda when available); "
        "default: cpu",
    )
    p.add_argument(
        "--folds",
        type=int,
        default=1,
        help="rank each query among its own fold's items only, the test set cut into N folds in "
        'feature-file order (MSCOCO 5k test: --folds 5 gives the 1k-fold protocol); records carry "fold"',
    )
    p.add_argument(
        "--faiss",
        action="store_true",
        help="first-stage top-k with FAISS's exact inner-product index (optional package faiss-cpu; CPU)",
    )


def add_extraction_args(
    p: argparse.ArgumentParser, resume_help: str, pretrained_alias: bool = False
) -> None:
    """Flags of extract_features.py, shared with extract_features_zs_mask+prompt.py."""
    p.add_argument("--extract-image-feats", action="store_true", help="write image features")
    p.add_argument("--extract-text-feats", action="store_true", help="write caption features")
    p.add_argument("--image-data", default=None, help="test images (.npz, key = image id)")
    p.add_argument("--text-data", default=None, help="test captions JSONL (query_id, query_text)")
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="images and captions per forward pass (what --img-batch-size and --text-batch-size "
        "set apart)",
    )
    p.add_argument(
        "--img-batch-size",
        type=int,
        default=None,
        help="images per forward pass (the release's name; default: --eval-batch-size)",
    )
    p.add_argument(
        "--text-batch-size",
        type=int,
        default=None,
        help="captions per forward pass (the release's name; default: --eval-batch-size)",
    )
    names = ("--resume", "--pretrained") if pretrained_alias else ("--resume",)
    p.add_argument(*names, dest="resume", required=True, help=resume_help)
    p.add_argument(
        "--image-feat-output-path", default=None, help="image features to write (.jsonl, or .npy)"
    )
    p.add_argument(
        "--text-feat-output-path", default=None, help="caption features to write (.jsonl, or .npy)"
    )
    p.add_argument("--model", default=None, help=model_help("model config"))
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="fp32 (the default): fp32 weights, no autocast, which is what the release's extraction scripts "
        "ran with their default --precision amp; here amp = fp32 weights with fp16 autocast (CUDA; fp32 "
        "on the CPU), which gives fp16 features: pass fp32 (or nothing) for the release's features. "
        "fp16 / bf16 = half / bfloat16 weights (fp16: CUDA, or the CPU to measure it), amp_bf16 = "
        "bfloat16 autocast",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers reading images")
