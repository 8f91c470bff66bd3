"""Top-k retrieval lists both ways from image and text features (spec section 4.2)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agree.io import run_cli  # noqa: E402
from eval.feature_io import read_retrieval_features  # noqa: E402
from eval.predictions import write_ranked_lists  # noqa: E402
from eval.topk import resolve_device, topk_lists  # noqa: E402


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with make_topk_predictions_mask+prompt.py."""
    p.add_argument("--image-feats", required=True, help="image features (.jsonl, or .npy + .ids.json)")
    p.add_argument("--text-feats", required=True, help="text features (.jsonl, or .npy + .ids.json)")
    p.add_argument("--top-k", type=int, default=10, help="items kept per query")
    p.add_argument("--eval-batch-size", type=int, default=256, help="queries scored at once (memory bound)")
    p.add_argument("--output-images", required=True, help="I2T predictions to write (keyed by image_id)")
    p.add_argument("--output-texts", required=True, help="T2I predictions to write (keyed by query_id)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    add_common_args(p)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    image, text = read_retrieval_features(args.image_feats, args.text_feats)
    t2i = topk_lists(text, image, args.top_k, args.eval_batch_size, device)
    i2t = topk_lists(image, text, args.top_k, args.eval_batch_size, device)
    write_ranked_lists((args.output_images, "image_id", i2t), (args.output_texts, "query_id", t2i))
    print(f"wrote {len(t2i)} text and {len(i2t)} image queries' top-{args.top_k} lists")
    return 0


if __name__ == "__main__":
    run_cli(main)
