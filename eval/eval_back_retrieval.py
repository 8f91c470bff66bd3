"""TBR re-ranking: `eval_back_retrieval.py IMG_GT IMG_PRED TXT_GT TXT_PRED IMG_OUT TXT_OUT`."""

import argparse

from agree.io import run_cli
from eval.cli import script_parser
from eval.metrics import recall, recall_list
from eval.predictions import as_ranked_lists, read_ranked_lists, write_ranked_lists
from eval.tbr import tbr_rerank


def build_parser() -> argparse.ArgumentParser:
    """The script's positional arguments."""
    p = script_parser(__doc__)
    p.add_argument("image_gt", help="I2T ground truth (test images JSONL)")
    p.add_argument("image_pred", help="I2T predictions (keyed by image_id)")
    p.add_argument("text_gt", help="T2I ground truth (test texts JSONL)")
    p.add_argument("text_pred", help="T2I predictions (keyed by query_id)")
    p.add_argument("image_out", help="re-ranked I2T predictions to write")
    p.add_argument("text_out", help="re-ranked T2I predictions to write")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    img_gt = read_ranked_lists(args.image_gt, "image_id", "ground truth")
    txt_gt = read_ranked_lists(args.text_gt, "query_id", "ground truth")
    img_pred = read_ranked_lists(args.image_pred, "image_id")
    txt_pred = read_ranked_lists(args.text_pred, "query_id")

    txt_rows = tbr_rerank(txt_pred, img_pred)
    img_rows = tbr_rerank(img_pred, txt_pred)
    txt_new = as_ranked_lists(args.text_out, "query_id", txt_rows)
    img_new = as_ranked_lists(args.image_out, "image_id", img_rows)
    # score everything before writing anything, so a bad input leaves no output behind
    lines = [
        ("T2I", "forward", recall(txt_gt, txt_pred)),
        ("T2I", "re-ranked", recall(txt_gt, txt_new)),
        ("I2T", "forward", recall(img_gt, img_pred)),
        ("I2T", "re-ranked", recall(img_gt, img_new)),
    ]
    write_ranked_lists(
        (args.image_out, "image_id", img_rows), (args.text_out, "query_id", txt_rows)
    )
    for direction, which, r in lines:
        print(f"{direction} {which} [mean, R@1, R@5, R@10]: {recall_list(r)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
