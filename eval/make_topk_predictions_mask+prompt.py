"""Top-k lists re-ranked with entity-guided re-ranking, EGR (docs/method.md §5.3)."""

import argparse

from agree.io import run_cli
from eval.array_ops import array_ops
from eval.cli import add_prediction_args, script_parser
from eval.egr import POOL, egr_lists
from eval.feature_io import read_retrieval_features, read_slot_features
from eval.folds import split_folds, tag_fold
from eval.predictions import write_ranked_lists


def build_parser() -> argparse.ArgumentParser:
    """The top-k flags plus the slot features and EGR's options."""
    p = script_parser(__doc__)
    add_prediction_args(p)
    p.add_argument("--mask-feats", required=True, help="masked-caption slot features per query")
    p.add_argument("--prompt-feats", required=True, help="prompt slot features per query")
    p.add_argument(
        "--pool-size", type=int, default=POOL, help="candidates re-ranked per query (release: 128)"
    )
    p.add_argument(
        "--real-slots-only",
        action="store_true",
        help='compute EGR over real entity slots only (default: the release\'s behaviour, the "" pads '
        "take part); "
        "needs the n_real_slots that extract_features_zs_mask+prompt.py records",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ops = array_ops(args.device)
    image, text = read_retrieval_features(args.image_feats, args.text_feats)
    prompt = read_slot_features(args.prompt_feats, text)
    mask = read_slot_features(args.mask_feats, text)
    t2i, i2t = [], []
    for fold, text_f, image_f, prompt_f, mask_f in split_folds(
        args.folds, text, image, prompt, mask
    ):
        fold_t2i, fold_i2t = egr_lists(
            ops,
            text_f,
            image_f,
            prompt_f,
            mask_f,
            args.top_k,
            args.eval_batch_size,
            args.real_slots_only,
            args.pool_size,
            args.faiss,
        )
        t2i += tag_fold(fold_t2i, fold, args.folds)
        i2t += tag_fold(fold_i2t, fold, args.folds)
    write_ranked_lists((args.output_images, "image_id", i2t), (args.output_texts, "query_id", t2i))
    print(f"wrote {len(t2i)} text and {len(i2t)} image queries' EGR top-{args.top_k} lists")
    return 0


if __name__ == "__main__":
    run_cli(main)
