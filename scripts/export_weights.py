"""Write the bare model weights of a checkpoint (training checkpoint, archive or state dict) as a state dict.

    python scripts/export_weights.py logs/run/checkpoints/epoch_10.pt tmp/pretrained_models/tiny.pt

The result loads with `clip.clip.load`, `--openai-pretrained --pretrained-path` and the zero-shot extractor,
and in OpenCLIP-based tools: `open_clip.create_model_and_transforms(NAME, pretrained=OUT)`, where NAME is
OpenCLIP's name of the configuration: "ViT-L-14-quickgelu" for this project's ViT-L-14 (OpenAI's QuickGELU
models: ViT-B-32, RN50 likewise), "ViT-L-14" for its ViT-L-14-gelu.
"""

from __future__ import annotations

import argparse

import torch

from agree.cli import HelpFormatter
from agree.io import atomic_path, run_cli
from agree.pretrained import clip_errors_as_input_errors
from clip.clip import load_checkpoint_state_dict, model_from_state_dict


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint, OpenAI archive or state dict")
    p.add_argument("output", help="where to write the state dict (.pt)")
    return p


def main() -> int:
    """Read the checkpoint, check that it builds a CLIP, write its state dict atomically."""
    args = build_parser().parse_args()
    with clip_errors_as_input_errors():
        state_dict = load_checkpoint_state_dict(args.checkpoint)
        model_from_state_dict(
            state_dict, args.checkpoint
        )  # fails early if these are not CLIP weights
    with atomic_path(args.output) as tmp:
        torch.save(state_dict, tmp)
    print(f"wrote {len(state_dict)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
