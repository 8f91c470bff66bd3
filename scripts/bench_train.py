"""Time one training step: (a) plain contrastive, (b) full AGREE, (c) the towers' lower bound for (b).

(c) is one forward + backward of the image tower over every image of an AGREE step (image, VG image,
VG masked image, grounding-masked image) and of the text tower over every text (caption, 5 prompts,
5 masked captions, VG prompt), with a trivial loss and no optimiser step. Target: (b) <= 1.15 x (c).
Prints numbers only; runs the tiny model on the CPU, and ViT-B-32 too when a GPU is present.

    python scripts/bench_train.py [--models tiny ViT-B-32] [--batch-size 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from agree.cli import HelpFormatter
from agree.precision import autocast, resolve_precision, weight_dtype
from clip.clip import create_model
from training.distributed import DistEnv
from training.engine import build_optimizer
from training.params import parse_args
from training.synthetic_batch import make_batch
from training.terms import AGREE_TERMS, IMAGE_SLOTS, TEXT_SLOTS
from training.train import StepConfig, train_step


def _time(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(
    model_name: str, batch_size: int, device: torch.device, repeats: int, precision: str | None
) -> dict:
    """Median seconds of (a), (b), (c) for one model."""
    precision = resolve_precision(precision, device)
    torch.manual_seed(0)
    model = create_model(
        model_name, device=device, precision="fp16" if precision == "fp16" else "fp32"
    )
    args = parse_args(["--train-data", "unused.jsonl", "--model", model_name])
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" else None
    env = DistEnv(device=device)
    full = make_batch(batch_size, model.visual.input_resolution)
    plain = {k: full[k] for k in ("image", "text")}
    cfg_plain = StepConfig(terms=(), env=env, precision=precision)
    cfg_full = StepConfig(terms=AGREE_TERMS, env=env, precision=precision)

    images = torch.cat([full[k] for k in IMAGE_SLOTS])
    texts = torch.cat(
        [full[k].flatten(0, 1) if full[k].dim() == 3 else full[k] for k in TEXT_SLOTS]
    )
    texts = texts[
        :, : int(texts.argmax(-1).max()) + 1
    ]  # what the text tower keeps of the padded context
    images = images.to(device, weight_dtype(precision))
    texts = texts.to(device)

    def lower_bound() -> None:
        model.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = model.encode_image(images).float().sum() + model.encode_text(texts).float().sum()
        loss.backward()

    out = {
        "a_plain_step": _time(
            lambda: train_step(model, plain, optimizer, scaler, cfg_plain), device, repeats
        ),
        "b_agree_step": _time(
            lambda: train_step(model, full, optimizer, scaler, cfg_full), device, repeats
        ),
        "c_towers_lower_bound": _time(lower_bound, device, repeats),
    }
    out["images_per_step"], out["texts_per_step"] = images.shape[0], texts.shape[0]
    out["text_tokens_kept"] = texts.shape[1]
    out["precision"] = precision
    return out


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=None, help="default: tiny, plus ViT-B-32 on a GPU"
    )
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed steps per case (the median is shown)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--precision",
        choices=["amp", "fp16", "fp32"],
        default=None,
        help="default: amp on a GPU, fp32 on the CPU",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU")
    return p


def main() -> int:
    """Parse flags, run the benchmarks, print one block per model."""
    a = build_parser().parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads:
        torch.set_num_threads(a.threads)
    models = a.models or (["tiny", "ViT-B-32"] if device.type == "cuda" else ["tiny"])
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {name}; torch {torch.__version__}; batch size {a.batch_size}; median of {a.repeats}"
    )
    for m in models:
        r = bench(m, a.batch_size, device, a.repeats, a.precision)
        print(
            f"[{m}] precision {r['precision']}: {r['images_per_step']} images + {r['texts_per_step']} texts "
            f"({r['text_tokens_kept']} token columns) per AGREE step"
        )
        print(f"  (a) plain contrastive step : {r['a_plain_step'] * 1000:9.1f} ms")
        print(f"  (b) full AGREE step        : {r['b_agree_step'] * 1000:9.1f} ms")
        print(f"  (c) towers lower bound     : {r['c_towers_lower_bound'] * 1000:9.1f} ms")
        print(
            f"  (b)/(c) = {r['b_agree_step'] / r['c_towers_lower_bound']:.3f} (target <= 1.15);  "
            f"(b)/(a) = {r['b_agree_step'] / r['a_plain_step']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
