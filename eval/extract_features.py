"""Image and caption features from a fine-tuned checkpoint (docs/method.md §5.1).

Runs in one process, or sharded over processes with `torchrun --nproc_per_node N eval/extract_features.py ...`
(one output file, in input order, the same as a single process writes).
"""

import argparse

from agree.io import run_cli
from eval.cli import add_extraction_args, script_parser
from eval.extraction import extract, load_finetuned


def build_parser() -> argparse.ArgumentParser:
    """The extraction flags (the release's names and the project's)."""
    p = script_parser(__doc__)
    add_extraction_args(
        p,
        "fine-tuned training checkpoint (checkpoints/epoch_N.pt); its config is --model, or the one "
        "the checkpoint records when --model is not given",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extract(
        args, lambda device, precision: load_finetuned(args.resume, args.model, device, precision)
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
