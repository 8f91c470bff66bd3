"""Zero-shot features from a pre-trained checkpoint (OpenAI or OpenCLIP): images, captions, and
entity prompt / mask slots.

Runs in one process, or sharded over processes with `torchrun --nproc_per_node N ...` (one output
file per feature set, in input order, the same as a single process writes).
"""

import argparse

from agree.entities import EVAL_SLOTS, PROMPT_TEMPLATE
from agree.io import run_cli
from eval.cli import add_extraction_args, script_parser
from eval.extraction import extract, load_zero_shot


def build_parser() -> argparse.ArgumentParser:
    """The extraction flags plus the entity slots'."""
    p = script_parser(__doc__)
    add_extraction_args(
        p,
        "pre-trained CLIP checkpoint: OpenAI archive (e.g. tmp/pretrained_models/ViT-L-14.pt), "
        "OpenCLIP state dict (with --model, e.g. ViT-B-32-gelu), or a model name; --pretrained is "
        "OpenCLIP's name for it",
        pretrained_alias=True,
    )
    p.add_argument(
        "--jit",
        action="store_true",
        help="read a TorchScript archive with torch.jit.load (runs the archive's code) instead of "
        "the reader that takes only its weights",
    )
    p.add_argument(
        "--extract-mask-feats", action="store_true", help="write masked-caption slot features"
    )
    p.add_argument("--extract-prompt-feats", action="store_true", help="write prompt slot features")
    p.add_argument(
        "--prompt-data", default=None, help="textual entities per caption (..._texts_segs.jsonl)"
    )
    p.add_argument(
        "--mask-feat-output-path", default=None, help="masked-caption slot features to write"
    )
    p.add_argument("--prompt-feat-output-path", default=None, help="prompt slot features to write")
    p.add_argument(
        "--slots",
        type=int,
        default=EVAL_SLOTS,
        help='entity slots per caption, padded with "" (the release\'s 10)',
    )
    p.add_argument(
        "--prompt-template", default=PROMPT_TEMPLATE, help="prompt built from each entity"
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    extract(
        args,
        lambda device, precision: load_zero_shot(
            args.resume, args.model, device, precision, jit=args.jit
        ),
        slots=True,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
