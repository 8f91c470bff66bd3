"""Convert feature files between JSONL and the binary format (`.npy` + `.ids.json`), by extension.

python3 scripts/convert_features.py IN.jsonl OUT.npy     # writes OUT.npy and OUT.ids.json
python3 scripts/convert_features.py IN.npy OUT.jsonl
"""

import argparse
from pathlib import Path

from agree.cli import HelpFormatter
from agree.io import InputError, run_cli
from eval.feature_io import detect_layout, is_binary, read_features, write_features


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("input", help="feature file to read (.jsonl or .npy)")
    p.add_argument(
        "output", help="feature file to write (.npy for binary, anything else for JSONL)"
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise InputError("input and output are the same file")
    key, slots = detect_layout(args.input)
    feats = read_features(args.input, key, slots)
    write_features(args.output, feats)
    kind = "binary" if is_binary(args.output) else "JSONL"
    print(
        f"{args.input} -> {args.output} ({kind}): {len(feats)} x {list(feats.data.shape[1:])} {key} features"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
