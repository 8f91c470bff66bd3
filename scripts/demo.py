#!/usr/bin/env python3
"""The demo experiment on CPU: synthetic world -> cached tiny CLIP backbone -> zero-shot re-ranking ->
global-only and AGREE fine-tuning over several training seeds (and the ablation with --preset full) ->
results.md, results.json, rsum.png, retrieval_examples.png under --out.

    python scripts/demo.py [--preset default|quick|full] [--out tmp/demo] [--seeds 0,1,2] [--lr 3e-4] ...

Every setting of the preset can be changed by its flag (see --help). `--eval-split val` scores on the
validation split instead of test (how the recipe was chosen); no twin scores and no EGR there.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from agree.cli import HelpFormatter, add_hidden_alias
from agree.io import InputError, run_cli
from agree.ownership import OutputFolder
from experiments.demo import OWNER, PRESETS, methods, recipe_dict, run, with_overrides
from experiments.report import build_rows, draw_examples, markdown, paired, plot_rsum, write_report


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def flag_name(field: str) -> str:
    """The flag of a recipe setting: counts of images are --num-*-images (--train-images names an
    archive in main_all.py), the rest --<setting>."""
    name = field.replace("_", "-")
    return f"--num-{name}" if field.endswith("_images") else f"--{name}"


SWITCHES = {
    "ablation": "also run AGREE minus each term",
    "lock_image": "fine-tune the text tower only",
}


def build_parser() -> argparse.ArgumentParser:
    """--preset, --out, --cache, --eval-split, and one flag per recipe setting (default: the preset's)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="default (3 seeds), quick (a first look, 1 seed, no claims) or full (the default preset "
        "and the ablation)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("tmp/demo"),
        help="results folder: what an earlier demo wrote there is replaced; a folder that holds "
        "anything else is refused (nothing the demo did not write is deleted)",
    )
    p.add_argument(
        "--cache", type=Path, default=Path("tmp/cache"), help="cached worlds and backbones"
    )
    p.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default="test",
        help="the split scored: test, or val (how the recipe was chosen)",
    )
    standard = PRESETS["default"]
    for f in dataclasses.fields(standard):
        flag, value = flag_name(f.name), getattr(standard, f.name)
        if f.name == "seeds":
            p.add_argument(
                flag,
                type=_seeds,
                default=None,
                help=f"training seeds, comma-separated (default: the preset's; {value} in the "
                "standard preset)",
            )
        elif f.name == "methods":
            p.add_argument(
                flag,
                type=lambda s: tuple(m.strip() for m in s.split(",") if m.strip()),
                default=None,
                help="fine-tuned methods, comma-separated: global-only, AGREE (default: both)",
            )
        elif f.name in SWITCHES:
            on = "on" if value else "off"
            p.add_argument(
                flag,
                dest=f.name,
                action="store_true",
                default=None,
                help=f"{SWITCHES[f.name]} (default: the preset's; {on} in the standard preset)",
            )
            p.add_argument(
                f"--no-{f.name.replace('_', '-')}",
                dest=f.name,
                action="store_false",
                help=f"the opposite of {flag}",
            )
        else:
            p.add_argument(
                flag,
                dest=f.name,
                type=type(f.default),
                default=None,
                help=f"{f.name.replace('_', ' ')} (default: the preset's; {value} in the standard "
                "preset)",
            )
            if flag != f"--{f.name.replace('_', '-')}":  # the demo's earlier name keeps working
                add_hidden_alias(p, f"--{f.name.replace('_', '-')}", f.name, type=type(f.default))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the demo and write its record."""
    args = build_parser().parse_args(argv)
    names = [f.name for f in dataclasses.fields(PRESETS["default"])]
    recipe = with_overrides(PRESETS[args.preset], **{n: getattr(args, n) for n in names})
    if min(recipe.seeds) < 0:
        raise InputError("--seeds: seeds must be non-negative")
    out = OutputFolder(args.out, OWNER)
    out.replace()  # refuses, naming the folder, if it holds a file the demo did not write
    measured, seconds, split = run(recipe, out, args.cache, args.eval_split)
    rows = build_rows(measured, split, methods(recipe), recipe.seeds)
    n_images = len(split.i2t_gt)
    record = {
        "preset": args.preset,
        "eval_split": args.eval_split,
        "recipe": recipe_dict(recipe),
        "sizes": {"eval_images": n_images, "eval_captions": len(split.captions)},
        "backbone": {"entities_found": measured.entities_found},
        "rows": rows,
        "paired": paired(rows),
        "seconds": seconds,
    }
    out.claim("rsum.png", "results.json", "results.md")
    plot_rsum(rows, args.out / "rsum.png")
    if args.eval_split == "test" and {"AGREE", "global-only"} <= set(recipe.methods):
        seed = recipe.seeds[0]
        out.claim("retrieval_examples.png")
        record["examples"] = draw_examples(
            split,
            measured.fine_tuned[("AGREE", seed)].top1["plain"],
            measured.fine_tuned[("global-only", seed)].top1["plain"],
            seed,
            args.out / "retrieval_examples.png",
        )
    write_report(args.out, record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    run_cli(main)
