"""Image and caption features from a fine-tuned checkpoint (docs/method.md §5.1).

Runs in one process, or sharded over processes with `torchrun --nproc_per_node N eval/extract_features.py ...`
(one output file, in input order, the same as a single process writes).
"""

import argparse

from agree.io import InputError, run_cli
from eval.cli import add_extraction_args
from eval.extraction import extract, load_finetuned


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_extraction_args(
        p, "fine-tuned training checkpoint (checkpoints/epoch_N.pt), built with --model"
    )
    args = p.parse_args(argv)
    if not args.model:
        raise InputError(
            "--model is required (the config the checkpoint was trained with, e.g. ViT-L-14)"
        )
    extract(
        args, lambda device, precision: load_finetuned(args.resume, args.model, device, precision)
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
