"""Disk use of the prepared layout, release form vs prepare_data.py's default, computed from the file formats.

    python scripts/disk_usage.py                       # the table of docs/data.md (Flickr30k and COCO)
    python scripts/disk_usage.py --check ROOT [--dataset flickr30k] [--storage uint8] [--resolution 224]

The table: image archives and masks of the release's layout (float32 arrays, an archive of masked
copies) and of the default (uint8 arrays, mask boxes), for the datasets' Karpathy splits, with
grounding masks counted at their upper bound (5 per training image, one per caption) and Visual
Genome per 1,000 vocabulary words at --vg-per-word 10 (dataprep.disk has the formulas). --check
compares the formulas with a layout prepare_data.py wrote under ROOT: per folder, the bytes written,
those of its archives and mask files and the same predicted from their keys and lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agree.cli import HelpFormatter
from agree.io import run_cli
from agree.layout import DEFAULT_DATASET, FILE_RESOLUTION, Layout
from dataprep.datasets import REGISTRY
from dataprep.datasets import names as dataset_names
from dataprep.disk import Counts, check, estimate, mask_line_bytes

# the table covers every registered dataset with published split sizes; VG per 1,000 words
MASKS_PER_IMAGE = 5
LABEL_CHARS = 5  # a typical grounding label: a mask key is "<file stem>_<label>"
TYPICAL_BOX = (
    101,
    57,
    188,
    224,
)  # one box per mask (a label with several boxes adds ~17 bytes each)
VG_PER_WORD, WORDS = 10, 1_000
FORMS = (
    ("release layout (float32, masked copies)", "float32", "images"),
    ("default (uint8, mask boxes)", "uint8", "boxes"),
)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def table(resolution: int) -> list[str]:
    """The markdown rows of the disk table."""
    lines = [
        "| dataset | part | " + " | ".join(label for label, _, _ in FORMS) + " |",
        "|---|---|" + "---:|" * len(FORMS),
    ]
    for dataset, spec in REGISTRY.items():
        if spec.split_sizes is None or spec.example_stem is None:
            continue
        train, val, test = spec.split_sizes
        mask_key = len(spec.example_stem) + 1 + LABEL_CHARS
        counts = Counts(
            train,
            val,
            test,
            MASKS_PER_IMAGE * train,
            VG_PER_WORD * WORDS,
            VG_PER_WORD * WORDS,
            key=6,  # imgid / cocoid
            mask_key=mask_key,
            mask_line=mask_line_bytes(mask_key, 6, [TYPICAL_BOX]),
        )
        est = [estimate(counts, storage, masks, resolution) for _, storage, masks in FORMS]
        for part, label in (
            ("images", f"train + val + test images ({train + val + test:,})"),
            ("grounding", f"grounding masks (at most {MASKS_PER_IMAGE * train:,})"),
            ("vg_images", f"VG images per {WORDS:,} words ({VG_PER_WORD} per word)"),
            ("vg_masks", f"VG masks per {WORDS:,} words"),
        ):
            lines.append(
                f"| {dataset} | {label} | " + " | ".join(_gib(e[part]) for e in est) + " |"
            )
        total = [e["dataset folder"] + e["VG"] for e in est]
        lines.append(
            f"| {dataset} | **total** | " + " | ".join(f"**{_gib(t)}**" for t in total) + " |"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--check", type=Path, default=None, metavar="ROOT", help="a prepare_data.py --out folder"
    )
    p.add_argument(
        "--dataset", choices=dataset_names(), default=DEFAULT_DATASET, help="the dataset under ROOT"
    )
    p.add_argument("--storage", choices=("uint8", "float32"), default="uint8", help="its --storage")
    p.add_argument("--resolution", type=int, default=FILE_RESOLUTION, help="its --resolution")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print the table, or check a prepared layout."""
    args = build_parser().parse_args(argv)
    if args.check is None:
        print("\n".join(table(args.resolution)))
        return 0
    lay = Layout.under(args.check, args.dataset)
    for row in check(lay.data_dir, lay.vg_dir, args.storage, args.resolution):
        print(
            f"{row['folder']:<15} written {row['written']:>12,} bytes: archives and masks "
            f"{row['archives and masks']:>12,} (predicted from the formats {row['predicted']:>12,}), "
            f"text files {row['text']:>10,}"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
