"""Recall@1/5/10 of a prediction file against ground truth: `evaluation.py GT PRED OUT KEY`.

Predictions made with `--folds N` (their records carry "fold") are scored within each fold and
averaged over the folds (MSCOCO's 1k-fold protocol); `scoreJson.folds` then lists each fold's values.
"""

import argparse
import json

from agree.io import InputError, atomic_write, run_cli
from eval.cli import script_parser
from eval.metrics import failure_record, recall, success_record
from eval.predictions import check_key, read_ranked_lists


def build_parser() -> argparse.ArgumentParser:
    """The script's positional arguments."""
    p = script_parser(__doc__)
    p.add_argument("ground_truth", help="ground-truth JSONL (test texts or test images)")
    p.add_argument("predictions", help="prediction JSONL to score")
    p.add_argument("output", help="where to write the score JSON")
    p.add_argument("key", help="query key: query_id (text queries) or image_id (image queries)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        key = check_key(args.key)
        gt = read_ranked_lists(args.ground_truth, key, "ground truth")
        pred = read_ranked_lists(args.predictions, key)
        record = success_record(recall(gt, pred))
    except InputError as e:
        # the release's contract: a failure record in OUT, and (ours) a non-zero exit
        detail = f"ground truth {args.ground_truth}, predictions {args.predictions}, key {args.key}"
        _write(args.output, failure_record(str(e), detail))
        raise
    _write(args.output, record)
    print(json.dumps(record))
    return 0


def _write(path: str, record: dict) -> None:
    # json (not orjson) so the small record reads exactly like the release's, spaces included
    with atomic_write(path) as f:
        f.write(json.dumps(record).encode())


if __name__ == "__main__":
    run_cli(main)
