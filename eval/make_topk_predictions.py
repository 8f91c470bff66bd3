"""Top-k retrieval lists both ways from image and text features (docs/method.md §5.2)."""

import argparse

from agree.io import run_cli
from eval.array_ops import array_ops
from eval.cli import add_prediction_args, script_parser
from eval.feature_io import read_retrieval_features
from eval.folds import split_folds, tag_fold
from eval.predictions import write_ranked_lists
from eval.topk import topk_lists


def build_parser() -> argparse.ArgumentParser:
    """The release's flags and the project's (--device, --folds, --faiss)."""
    p = script_parser(__doc__)
    add_prediction_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ops = array_ops(args.device)
    image, text = read_retrieval_features(args.image_feats, args.text_feats)
    t2i, i2t = [], []
    for fold, text_f, image_f in split_folds(args.folds, text, image):
        fold_t2i, fold_i2t = topk_lists(
            ops, text_f, image_f, args.top_k, args.eval_batch_size, args.faiss
        )
        t2i += tag_fold(fold_t2i, fold, args.folds)
        i2t += tag_fold(fold_i2t, fold, args.folds)
    write_ranked_lists((args.output_images, "image_id", i2t), (args.output_texts, "query_id", t2i))
    print(f"wrote {len(t2i)} text and {len(i2t)} image queries' top-{args.top_k} lists")
    return 0


if __name__ == "__main__":
    run_cli(main)
