"""Build the release layout (datasets/<dataset>_images/..., VG/...) from the official raw downloads.

    python scripts/prepare_data.py --dataset flickr30k --raw RAW --vg-raw VGRAW --out tmp [--boxes boxes.jsonl]
    python scripts/prepare_data.py --dataset coco      --raw RAW --vg-raw VGRAW --out tmp ...

RAW holds Karpathy's split file (dataset_flickr30k.json / dataset_coco.json) and the images
(flickr30k-images/, or train2014/ and val2014/), and for Flickr30k optionally flickr30k_entities/
(Sentences/, Annotations/). VGRAW holds Visual Genome's image_data.json, objects.json, VG_100K/ and
VG_100K_2/. See the README's "Data from raw sources".
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from agree.cli import HelpFormatter
from agree.io import run_cli
from agree.layout import DEFAULT_DATASET, FILE_RESOLUTION
from dataprep.datasets import names as dataset_names


def build_parser() -> argparse.ArgumentParser:
    """The flags (the contract of issue 13, plus tuning flags with documented defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--dataset",
        choices=dataset_names(),
        default=DEFAULT_DATASET,
        help="which dataset RAW holds",
    )
    p.add_argument(
        "--raw", type=Path, required=True, help="folder of the dataset's official downloads"
    )
    p.add_argument(
        "--vg-raw", type=Path, required=True, help="folder of Visual Genome's official downloads"
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="root of the layout (tmp in the README): writes OUT/datasets/<dataset>_images and OUT/VG",
    )
    p.add_argument(
        "--boxes",
        type=Path,
        default=None,
        help="detector boxes, JSONL {image, label, box: [x0, y0, x1, y1], score} in original pixels "
        "(default: Flickr30k Entities' gold boxes when RAW/flickr30k_entities/Annotations exists)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=FILE_RESOLUTION,
        help="side R of the stored images: the model's input resolution (224 for ViT-B/32 and ViT-L/14)",
    )
    p.add_argument(
        "--max-missing-fraction",
        type=float,
        default=0.0,
        help="largest share of each kind of input (images, captions, boxes, Entities files, VG images) "
        "that may be skipped as missing or unreadable; 0 = any such input stops the run",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild a layout that is already there (default: a finished layout is left as is)",
    )
    p.add_argument(
        "--masks",
        choices=("boxes", "images"),
        default="boxes",
        help="boxes (default): write the pixel boxes of each mask (<dataset>_visual_grounding.<R>.boxes.jsonl, "
        "VG/VG_mask_boxes.<R>.jsonl), filled at load time by fine-tuning; images: write the release's "
        "archives of masked copies (<dataset>_visual_grounding.<R>.npz, VG/VG_mask_images.<R>.npz). "
        "Fine-tuning receives the same tensors from either (docs/data.md)",
    )
    p.add_argument(
        "--storage",
        choices=("uint8", "float32"),
        default="uint8",
        help="uint8 (default): (R, R, 3) RGB; float32: (3, R, R) CLIP-normalised arrays as the release's "
        "archives, 4x larger. Fine-tuning and evaluation receive the same tensors from either (docs/data.md)",
    )
    p.add_argument(
        "--extractor",
        choices=("textblob", "spacy"),
        default="textblob",
        help="noun-phrase extractor for captions without Flickr30k Entities phrases",
    )
    p.add_argument(
        "--spacy-model",
        default="en_core_web_sm",
        help="installed spaCy pipeline for --extractor spacy (never downloaded)",
    )
    p.add_argument(
        "--no-gold-entities",
        action="store_true",
        help="ignore RAW/flickr30k_entities (phrases and boxes); use --extractor and --boxes only",
    )
    p.add_argument(
        "--box-threshold",
        type=float,
        default=0.5,
        help="detector boxes below this score are ignored",
    )
    p.add_argument(
        "--vg-per-word", type=int, default=10, help="Visual Genome images kept per vocabulary word"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that decode images (0 = all in this process)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and prepare the layout."""
    args = parse_args(argv)
    from dataprep.pipeline import PrepareConfig, prepare

    prepare(
        PrepareConfig(
            dataset=args.dataset,
            raw=args.raw,
            vg_raw=args.vg_raw,
            out=args.out,
            boxes=args.boxes,
            resolution=args.resolution,
            storage=args.storage,
            masks=args.masks,
            extractor=args.extractor,
            spacy_model=args.spacy_model,
            gold_entities=not args.no_gold_entities,
            box_threshold=args.box_threshold,
            vg_per_word=args.vg_per_word,
            max_missing_fraction=args.max_missing_fraction,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=not args.no_progress,
        )
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
