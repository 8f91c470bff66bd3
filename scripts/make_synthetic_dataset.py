#!/usr/bin/env python3
"""Generate the synthetic, entity-rich AGREE dataset under --out: raw downloads (raw/, VG_raw/) and the release
file layout built from them by the pipeline of scripts/prepare_data.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from agree.cli import HelpFormatter, add_hidden_alias
from agree.io import InputError, run_cli
from synth.writer import SynthConfig, SynthLayout, generate


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (all sizes settable; defaults suit a tiny 64-px CLIP on CPU)."""
    d = SynthConfig(out=Path("."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="dataset root (gets raw/, VG_raw/, datasets/, VG/, pretrain/, synthetic/)",
    )
    p.add_argument(
        "--seed",
        type=_int_in(0, 2**32 - 1),
        default=d.seed,
        help="random seed (default %(default)s)",
    )
    add_hidden_alias(p, "--train-images", "train_images", type=_int_in(1, 1_000_000))
    p.add_argument(
        "--num-train-images",
        dest="train_images",
        type=_int_in(1, 1_000_000),
        default=d.train_images,
        help="training images (default %(default)s)",
    )
    p.add_argument(
        "--train-captions",
        type=_int_in(1, 5),
        default=d.train_captions,
        help="captions per training image, one jsonl record each (default %(default)s)",
    )
    add_hidden_alias(p, "--val-images", "val_images", type=_int_in(1, 1_000_000))
    p.add_argument(
        "--num-val-images",
        dest="val_images",
        type=_int_in(1, 1_000_000),
        default=d.val_images,
        help="validation images, 5 captions each (default %(default)s)",
    )
    add_hidden_alias(p, "--test-images", "test_images", type=_int_in(1, 1_000_000))
    p.add_argument(
        "--num-test-images",
        dest="test_images",
        type=_int_in(1, 1_000_000),
        default=d.test_images,
        help="test images, 5 queries each (default %(default)s)",
    )
    add_hidden_alias(p, "--pretrain-images", "pretrain_images", type=_int_in(0, 1_000_000))
    p.add_argument(
        "--num-pretrain-images",
        dest="pretrain_images",
        type=_int_in(0, 1_000_000),
        default=d.pretrain_images,
        help="images of the simple-caption pretraining split, 0 = none (default %(default)s)",
    )
    p.add_argument(
        "--pretrain-captions",
        type=_int_in(1, 3),
        default=d.pretrain_captions,
        help="captions per pretraining image (default %(default)s)",
    )
    p.add_argument(
        "--vg-per-object",
        type=_int_in(1, 10_000),
        default=d.vg_per_object,
        help="Visual-Genome-like images per object word (default %(default)s)",
    )
    p.add_argument(
        "--resolution",
        type=_int_in(32, 1024),
        default=d.resolution,
        help="image side R in pixels (default %(default)s; file names keep '.224')",
    )
    p.add_argument(
        "--preprocessed",
        action="store_true",
        help="store float32 (3,R,R) CLIP-normalised arrays instead of uint8 (R,R,3) RGB",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, generate, print a summary."""
    args = build_parser().parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a directory")
    cfg = SynthConfig(
        out=args.out,
        seed=args.seed,
        train_images=args.train_images,
        val_images=args.val_images,
        test_images=args.test_images,
        pretrain_images=args.pretrain_images,
        resolution=args.resolution,
        train_captions=args.train_captions,
        pretrain_captions=args.pretrain_captions,
        vg_per_object=args.vg_per_object,
        preprocessed=args.preprocessed,
    )
    counts = generate(cfg, progress=not args.quiet)
    lay = SynthLayout.under(args.out)
    fmt = "float32 (3,R,R) CLIP-normalised" if args.preprocessed else "uint8 (R,R,3) RGB"
    print(
        f"synthetic dataset written to {lay.root} in {counts['seconds']:.1f} s "
        f"(seed {args.seed}, {args.resolution}px, {fmt})"
    )
    rows = [
        (
            "raw",
            f"{counts['raw_images']} images, {counts['raw_captions']} captions (+ VG_raw/)",
            lay.raw.raw,
        ),
        (
            "train",
            f"{counts['train_images']} images, {counts['train_captions']} captions",
            lay.train_jsonl,
        ),
        ("grounding", f"{counts['grounding_images']} masks (boxes)", lay.grounding_boxes),
        ("val", f"{counts['val_images']} images x 5 captions", lay.val_json),
        (
            "test",
            f"{counts['test_images']} images, {counts['test_queries']} queries",
            lay.test_texts,
        ),
        (
            "VG",
            f"{counts['vg_images']} of {counts['vg_raw_images']} images usable "
            f"({counts['vg_masked_images']} masked), {counts['vg_words']} words",
            lay.vg_vocab,
        ),
    ]
    if "pretrain_images" in counts:
        rows.append(
            (
                "pretrain",
                f"{counts['pretrain_images']} images, {counts['pretrain_captions']} captions",
                lay.pretrain_jsonl,
            )
        )
    for name, what, path in rows:
        print(f"  {name:<10} {what:<44} {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
