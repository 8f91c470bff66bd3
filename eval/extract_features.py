"""Image and caption features from a fine-tuned checkpoint (spec section 4.1)."""
import argparse

from agree.io import InputError, run_cli
from agree.precision import resolve_device
from eval.cli import add_extraction_args
from eval.extraction import load_finetuned, plan_extraction, resolve_extraction_precision, run_extraction


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_extraction_args(p, "fine-tuned training checkpoint (checkpoints/epoch_N.pt), built with --model")
    args = p.parse_args(argv)
    if not args.model:
        raise InputError("--model is required (the config the checkpoint was trained with, e.g. ViT-L-14)")
    device = resolve_device(args.device)
    precision = resolve_extraction_precision(args.precision, device)
    plan = plan_extraction(args)
    model = load_finetuned(args.resume, args.model, device, precision)
    run_extraction(plan, model, args, device, precision)
    return 0


if __name__ == "__main__":
    run_cli(main)
