"""Ground every training caption's textual entities in its image with an open-vocabulary detector, writing the
--boxes JSONL that scripts/prepare_data.py reads (the route for COCO, which has no gold boxes).

    python scripts/ground_entities.py --dataset coco --raw RAW --detector grounding-dino \\
        --detector-path weights/grounding-dino-tiny --out boxes.jsonl --device cuda
    python scripts/prepare_data.py --dataset coco --raw RAW --vg-raw VGRAW --out tmp \\
        --boxes boxes.jsonl --box-threshold 0.35

The detector is loaded with Hugging Face transformers (pip install -e ".[grounding]") from a folder
written by save_pretrained; nothing is downloaded. A killed run continues where it stopped when run
again with the same flags. See docs/data.md, "Grounding boxes from a detector".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agree.cli import HelpFormatter
from agree.io import run_cli
from dataprep.datasets import names as dataset_names
from dataprep.detector import DEFAULT_THRESHOLD, DETECTORS


def build_parser() -> argparse.ArgumentParser:
    """The flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--dataset", choices=dataset_names(), required=True, help="which dataset RAW holds"
    )
    p.add_argument(
        "--raw",
        type=Path,
        required=True,
        help="folder of the dataset's official downloads, as for prepare_data.py",
    )
    p.add_argument(
        "--detector", choices=DETECTORS, required=True, help="which open-vocabulary detector"
    )
    p.add_argument(
        "--detector-path",
        type=Path,
        required=True,
        help="folder holding the detector's weights and processor, written by save_pretrained",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the boxes JSONL to write (OUT.partial and OUT.progress while it runs)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the detector (default cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument(
        "--box-threshold",
        type=float,
        default=None,
        help="keep (box, phrase) pairs scoring at least this (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_THRESHOLD.items())
        + ")",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and ground the training captions."""
    args = parse_args(argv)
    from dataprep.detect_boxes import GroundConfig, ground

    ground(
        GroundConfig(
            dataset=args.dataset,
            raw=args.raw,
            detector=args.detector,
            detector_path=args.detector_path,
            out=args.out,
            device=args.device,
            batch_size=args.batch_size,
            box_threshold=args.box_threshold,
        )
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
