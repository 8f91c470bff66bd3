"""Winoground-style text / image / group scores of twin pairs, from any image and text feature files:

    python eval/eval_twins.py --image-feats IMG --text-feats TXT --pairs twin_pairs.jsonl --output twins.json

Pairs file: one JSON object per line, {"kind", "image_a", "image_b", "text_a", "text_b"} (ids in the
feature files). Output: {kind: {"n", "text", "text_se", "image", "image_se", "group", "group_se"}}
in percent, per kind and over all pairs ("all").
"""

import argparse

from agree.io import run_cli, write_json
from eval.cli import script_parser
from eval.feature_io import read_retrieval_features
from eval.twins import read_twin_pairs, score_twins


def build_parser() -> argparse.ArgumentParser:
    """Feature files, pairs, output."""
    p = script_parser(__doc__)
    p.add_argument(
        "--image-feats", required=True, help="image features (.jsonl, or .npy + .ids.json)"
    )
    p.add_argument(
        "--text-feats", required=True, help="caption features (.jsonl, or .npy + .ids.json)"
    )
    p.add_argument("--pairs", required=True, help="twin pairs JSONL")
    p.add_argument("--output", required=True, help="where to write the scores (JSON)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    pairs = read_twin_pairs(args.pairs)
    image, text = read_retrieval_features(args.image_feats, args.text_feats)
    scores = score_twins(pairs, image, text, args.pairs)
    write_json(args.output, scores)
    for kind, row in scores.items():
        print(
            f"{kind:>9} (n={row['n']}): "
            + "  ".join(
                f"{s} {row[s]:5.1f} ± {row[s + '_se']:.1f}" for s in ("text", "image", "group")
            )
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
