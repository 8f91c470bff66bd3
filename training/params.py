"""Command-line flags of `training/main_all.py` (released names and defaults, plus AGREE additions)."""

from __future__ import annotations

import argparse
from time import gmtime, strftime
from typing import Optional, Sequence

from agree.cli import HelpFormatter, add_hidden_alias, model_help
from agree.io import InputError
from agree.layout import DATASETS, DEFAULT_DATASET, dataset_of
from agree.precision import PRECISIONS
from training.augment import AUGMENTATIONS, NONE
from training.terms import add_term_flags


def default_hyperparams(model_name: str) -> dict:
    """AdamW defaults when --lr/--beta1/--beta2/--eps are not given (docs/method.md §4)."""
    name = model_name.replace("/", "-")
    lr = 4.0e-4 if name.startswith("ViT-L") else 5.0e-4
    return {"lr": lr, "beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}


def _data_flags(p: argparse.ArgumentParser) -> None:
    """Where the training data is."""
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="Dataset name in the layout's file names (<dataset>_train_pred.jsonl, ...). Default: the "
        f"one --train-data is named for (coco_train_pred.jsonl -> coco), else {DEFAULT_DATASET}.",
    )
    d.add_argument(
        "--train-data",
        type=str,
        required=True,
        help="Training captions + entities (flickr30k_train_pred.jsonl).",
    )
    d.add_argument(
        "--val-data",
        type=str,
        default=None,
        help="Validation captions (flickr30k_val.json: list of {image, caption: [5 captions]}).",
    )
    d.add_argument(
        "--dataset-type",
        choices=["auto", "json"],
        default="auto",
        help="Annotation format; 'auto' infers it from the file extension (.jsonl/.json).",
    )
    d.add_argument(
        "--img-key", type=str, default="image", help="Record key holding the image path."
    )
    d.add_argument(
        "--caption-key", type=str, default="caption", help="Record key holding the caption(s)."
    )
    d.add_argument(
        "--data-root",
        type=str,
        default=None,
        help="Flickr30k folder in the release layout (annotation/, objects/, grounding npz). "
        "Default: the folder above the annotation/ folder holding --train-data, "
        "else ./tmp/datasets/flickr30k_images.",
    )
    d.add_argument(
        "--vg-root",
        type=str,
        default=None,
        help="Visual Genome folder (VG_images.224.npz, VG_mask_images.224.npz, "
        "vocab_VG_images_objs.jsonl). Default: <data-root>/../../VG, i.e. ./tmp/VG.",
    )
    d.add_argument(
        "--train-images",
        type=str,
        default=None,
        help="Train image archive. Default: <data-root>/annotation/flickr30k_train_images.npz.",
    )
    d.add_argument(
        "--val-images",
        type=str,
        default=None,
        help="Val image archive (key = index in --val-data). "
        "Default: <data-root>/annotation/flickr30k_val_images.npz.",
    )
    d.add_argument(
        "--train-objects",
        type=str,
        nargs="+",
        default=None,
        metavar="FILE",
        help="Objects per image (--is-da-loss/--is-da-mask), one or more files read in order (a later "
        "file's line wins for the same image). Default, as the release: "
        "<data-root>/objects/flickr30k_{train,test,val}_imgs_objs.jsonl.",
    )
    d.add_argument(
        "--grounding-boxes",
        type=str,
        default=None,
        help="Mask boxes of the grounded entities, filled at load time (--is-vg; prepare_data.py --masks boxes). "
        "Default: <data-root>/flickr30k_visual_grounding.224.boxes.jsonl when it exists, else --grounding-images.",
    )
    d.add_argument(
        "--grounding-images",
        type=str,
        default=None,
        help="Images with a grounded entity masked (--is-vg; the release's archive). "
        "Default: <data-root>/flickr30k_visual_grounding.224.npz, used when no mask-box file is there.",
    )
    d.add_argument(
        "--vg-images",
        type=str,
        default=None,
        help="VG images (--is-da-loss/--is-da-mask). Default: <vg-root>/VG_images.224.npz.",
    )
    d.add_argument(
        "--vg-mask-boxes",
        type=str,
        default=None,
        help="Mask box of each VG object, filled at load time (--is-da-mask; prepare_data.py --masks boxes). "
        "Default: <vg-root>/VG_mask_boxes.224.jsonl when it exists, else --vg-mask-images.",
    )
    d.add_argument(
        "--vg-mask-images",
        type=str,
        default=None,
        help="VG images with one object masked (--is-da-mask; the release's archive). "
        "Default: <vg-root>/VG_mask_images.224.npz, used when no mask-box file is there.",
    )
    d.add_argument(
        "--vg-vocab",
        type=str,
        default=None,
        help="Object word -> VG images (--is-da-loss/--is-da-mask). "
        "Default: <vg-root>/vocab_VG_images_objs.jsonl.",
    )
    d.add_argument(
        "--max-missing-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="Largest fraction of missing training inputs allowed, per kind: grounding images of "
        "grounded captions, objects lines of train images, VG (masked) images of usable VG "
        "entries. Checked over the whole training file before the first step; above it the run "
        "stops with an error naming the file and the first missing key. 0 = any miss is an "
        "error; a larger F trains the missing ones with the masked-square substitute (docs/method.md §1.3, §1.4).",
    )
    d.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=NONE,
        help="Training image augmentation, the same for uint8 and float32 archives: none (the release's "
        "recipe) or random-resized-crop (RandomResizedCrop scale 0.9-1, as OpenCLIP's default train "
        "transform).",
    )
    d.add_argument("--workers", type=int, default=1, help="DataLoader worker processes per rank.")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    """Batch, schedule, optimiser, precision."""
    o = p.add_argument_group("optimisation")
    o.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="Batch size per rank (per micro-batch with --accum-freq).",
    )
    o.add_argument(
        "--accum-freq",
        type=int,
        default=1,
        help="Micro-batches per optimiser step. Features of all of them are cached, so every term sees "
        "the batch-size x accum-freq x ranks examples of a step, in the memory of one micro-batch.",
    )
    o.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="Validation batch size (default: --batch-size); --batch-size-eval is accepted too.",
    )
    add_hidden_alias(o, "--batch-size-eval", "eval_batch_size", type=int)
    o.add_argument("--epochs", type=int, default=32, help="Number of epochs.")
    o.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        metavar="N",
        help="Stop after epoch N of the --epochs schedule (the learning rate still follows the "
        "--epochs schedule, so epoch_N.pt is the one a full run writes); epoch_N.pt is saved. "
        "Default: run every epoch.",
    )
    o.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Peak learning rate (default: 5e-4, 4e-4 for ViT-L/14).",
    )
    o.add_argument("--beta1", type=float, default=None, help="AdamW beta1 (default 0.9).")
    o.add_argument("--beta2", type=float, default=None, help="AdamW beta2 (default 0.98).")
    o.add_argument("--eps", type=float, default=None, help="AdamW epsilon (default 1e-6).")
    o.add_argument(
        "--wd",
        type=float,
        default=0.2,
        help="Weight decay (not applied to bn/ln/bias/logit_scale).",
    )
    o.add_argument(
        "--warmup", type=int, default=10000, help="Linear warm-up steps before the cosine decay."
    )
    o.add_argument(
        "--skip-scheduler", action="store_true", help="Keep the learning rate constant at --lr."
    )
    o.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="amp (fp16 autocast), amp_bf16 (bfloat16 autocast), bf16 (bfloat16 weights), fp16 (fp16 "
        "weights, GPU only) or fp32; default: amp on a GPU, fp32 on the CPU.",
    )
    o.add_argument(
        "--grad-clip-norm",
        type=float,
        default=None,
        help="Clip the gradient's global L2 norm to this value before each update.",
    )
    o.add_argument(
        "--seed", type=int, default=0, help="Seed for initialisation, shuffling and augmentation."
    )


def _model_flags(p: argparse.ArgumentParser) -> None:
    """Which model and starting weights."""
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        type=str,
        default="ViT-L/14",
        help=model_help("Model config (ViT-L/14 is the recipe's and the paper's)"),
    )
    m.add_argument(
        "--openai-pretrained",
        action="store_true",
        help="Start from the pre-trained --model weights at --pretrained-path (an OpenAI archive "
        "or an OpenCLIP state dict) instead of random weights.",
    )
    m.add_argument(
        "--pretrained",
        type=str,
        default=None,
        metavar="PATH",
        help="OpenCLIP's name for starting from pre-trained weights: the same as --openai-pretrained "
        "--pretrained-path PATH.",
    )
    m.add_argument(
        "--pretrained-path",
        type=str,
        default=None,
        help="What --openai-pretrained loads. Default: tmp/pretrained_models/<model, '/'->'-'>.pt.",
    )
    m.add_argument(
        "--jit",
        action="store_true",
        help="Read a TorchScript archive with torch.jit.load, which runs the archive's code, instead "
        "of the reader that takes only its weights (for an archive that reader refuses).",
    )
    m.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="Recompute each transformer block (ResNet stage) of both towers in the backward pass "
        "instead of keeping its activations.",
    )
    m.add_argument(
        "--torchcompile",
        action="store_true",
        help="Compile the model with torch.compile (OpenCLIP's flag). The first steps are slower while "
        "it compiles (again for each new caption length, until that length is made dynamic); needs "
        "a C++ compiler on the CPU.",
    )
    m.add_argument(
        "--lock-image",
        action="store_true",
        help="Freeze the image tower (its BatchNorm statistics too), except --lock-image-unlocked-groups.",
    )
    m.add_argument(
        "--lock-image-unlocked-groups",
        type=int,
        default=0,
        help="With --lock-image: leave the last N layer groups trainable (groups: stem, each "
        "transformer block or ResNet stage, head = final norm + projection or attention pool).",
    )
    m.add_argument(
        "--lock-text",
        action="store_true",
        help="Freeze the text tower, except --lock-text-unlocked-groups.",
    )
    m.add_argument(
        "--lock-text-unlocked-groups",
        "--lock-text-unlocked-layers",
        type=int,
        default=0,
        help="With --lock-text: leave the last N layer groups trainable (groups: token + position "
        "embeddings, each transformer block, head = final norm + projection); the second name is "
        "OpenCLIP's.",
    )


def _term_flags(p: argparse.ArgumentParser) -> None:
    """The five AGREE terms (one flag each)."""
    a = p.add_argument_group("AGREE loss terms (each flag enables its own term only)")
    add_term_flags(a)
    a.add_argument(
        "--legacy-detached-rank",
        action="store_true",
        help="Reproduce the released code's gradients (docs/method.md §2.1): the hinge sums of the three "
        "ranking terms are detached (no gradient to the towers), then divided by the logit "
        "scale tau, so tau alone receives their gradient, -S/tau^2; and its logit-scale clamp, to "
        "the literal 4.6052 instead of ln 100 = 4.6051702.",
    )


def _distributed_flags(p: argparse.ArgumentParser) -> None:
    """Processes, gathering, devices."""
    t = p.add_argument_group("distributed")
    t.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="Worker processes to start, one per GPU on CUDA (gloo workers on the CPU); the global batch "
        "is N x --batch-size. Default, as the release: one per visible GPU when training on CUDA "
        "(without --gpu or a --device index), 1 otherwise. Not with torchrun, which sets its own.",
    )
    t.add_argument(
        "--dist-url",
        type=str,
        default="tcp://127.0.0.1:6100",
        help="Rendezvous URL of the workers started with --nproc (or per GPU), and of torchrun workers "
        "without MASTER_ADDR (torchrun's own is env://).",
    )
    t.add_argument(
        "--dist-backend",
        type=str,
        default=None,
        help="nccl or gloo; default: nccl on a GPU, gloo on the CPU.",
    )
    t.add_argument(
        "--skip-aggregate",
        action="store_true",
        help="Do not gather features across ranks (each rank's terms see only its own batch).",
    )
    t.add_argument(
        "--gather-with-grad",
        action="store_true",
        help="Send gradients through the features gathered from other ranks.",
    )
    t.add_argument(
        "--use-bn-sync",
        action="store_true",
        help="Convert BatchNorm to SyncBatchNorm under DDP (RN50).",
    )
    t.add_argument(
        "--device",
        type=str,
        default=None,
        help="cpu, cuda (every visible GPU, one worker each) or cuda:K (one process on GPU K); default: "
        "cuda when available. Worker k (torchrun: LOCAL_RANK k) uses cuda:k.",
    )
    t.add_argument(
        "--gpu",
        type=int,
        default=None,
        help="Train in one process on this CUDA device (as the release).",
    )


def _bookkeeping_flags(p: argparse.ArgumentParser) -> None:
    """Run directory, checkpoints, logging."""
    b = p.add_argument_group("bookkeeping")
    b.add_argument("--logs", type=str, default="./logs/", help="Where run directories are created.")
    b.add_argument(
        "--name",
        type=str,
        default=None,
        help="Run directory name (default: lr=.._wd=.._agg=.._model=.._batchsize=.._workers=.._date=..).",
    )
    b.add_argument(
        "--save-frequency",
        type=int,
        default=1,
        help="Write checkpoints/epoch_N.pt every N epochs (and at the last epoch); 0 = never.",
    )
    b.add_argument(
        "--save-most-recent", action="store_true", help="Also keep checkpoints/epoch_latest.pt."
    )
    b.add_argument(
        "--delete-previous-checkpoint",
        action="store_true",
        help="After writing checkpoints/epoch_N.pt, delete epoch_{N - --save-frequency}.pt (OpenCLIP's "
        "flag), so that the epoch checkpoints do not pile up; epoch_latest.pt is kept.",
    )
    b.add_argument(
        "--save-every-n-steps",
        type=int,
        default=0,
        help="Also write checkpoints/epoch_latest.pt every N steps inside an epoch (0 = off).",
    )
    b.add_argument(
        "--resume",
        type=str,
        default=None,
        help="Checkpoint to continue from, or 'latest': the newest checkpoint of run --name, or a new run "
        "when it has none yet (so one command serves the first launch and every requeue).",
    )
    b.add_argument(
        "--report-to",
        type=str,
        default="",
        help="tensorboard, wandb or all (comma-separated); default: the log file only.",
    )
    b.add_argument(
        "--wandb-notes", type=str, default="", help="Notes for a wandb run (default: none)."
    )
    b.add_argument(
        "--log-every-n-steps", type=int, default=100, help="Log line and scalars every N steps."
    )
    b.add_argument("--debug", action="store_true", help="Verbose logging.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one flag per released option that still makes sense)."""
    p = argparse.ArgumentParser(
        prog="training/main_all.py",
        description="AGREE fine-tuning of CLIP (global contrastive loss plus the five entity-alignment terms).",
        formatter_class=HelpFormatter,
    )
    for add in (
        _data_flags,
        _optimisation_flags,
        _model_flags,
        _term_flags,
        _distributed_flags,
        _bookkeeping_flags,
    ):
        add(p)
    return p


def default_run_name(args: argparse.Namespace) -> str:
    """The released default run name (lr, wd, aggregate, model, batch size, workers, UTC start time), with
    the model's '/' written '-' (ViT-L/14 -> ViT-L-14) so that the name is one folder.

    Each process computes it at its own start; `training.engine.run` replaces it on every rank by rank 0's."""
    model = args.model.replace("/", "-")
    return strftime(
        f"lr={args.lr}_wd={args.wd}_agg={args.aggregate}_model={model}_batchsize={args.batch_size}"
        f"_workers={args.workers}_date=%Y-%m-%d-%H-%M-%S",
        gmtime(),
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags, fill model-dependent defaults and check flag values."""
    args = build_parser().parse_args(argv)
    if args.dataset is None:
        args.dataset = dataset_of(args.train_data) if args.train_data else DEFAULT_DATASET
    for key, value in default_hyperparams(args.model).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.aggregate = not args.skip_aggregate
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.pretrained is not None:  # OpenCLIP's spelling of --openai-pretrained --pretrained-path
        if args.pretrained_path is not None and args.pretrained_path != args.pretrained:
            raise InputError(
                f"--pretrained {args.pretrained} and --pretrained-path {args.pretrained_path} name "
                "different checkpoints; give one"
            )
        args.openai_pretrained, args.pretrained_path = True, args.pretrained
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--eval-batch-size", args.eval_batch_size, 1),
        ("--accum-freq", args.accum_freq, 1),
        ("--lock-image-unlocked-groups", args.lock_image_unlocked_groups, 0),
        ("--lock-text-unlocked-groups", args.lock_text_unlocked_groups, 0),
        ("--epochs", args.epochs, 1),
        ("--workers", args.workers, 0),
        ("--warmup", args.warmup, 0),
        ("--save-frequency", args.save_frequency, 0),
        ("--save-every-n-steps", args.save_every_n_steps, 0),
        ("--log-every-n-steps", args.log_every_n_steps, 1),
    ):
        if value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if args.stop_after_epoch is not None and not 1 <= args.stop_after_epoch <= args.epochs:
        raise InputError(
            f"--stop-after-epoch must be between 1 and --epochs ({args.epochs}), "
            f"got {args.stop_after_epoch}"
        )
    if not 0.0 <= args.max_missing_fraction <= 1.0:
        raise InputError(
            f"--max-missing-fraction must be between 0 and 1, got {args.max_missing_fraction}"
        )
    if args.grad_clip_norm is not None and not args.grad_clip_norm > 0:
        raise InputError(f"--grad-clip-norm must be > 0, got {args.grad_clip_norm}")
    for tower in ("image", "text"):
        if getattr(args, f"lock_{tower}_unlocked_groups") and not getattr(args, f"lock_{tower}"):
            raise InputError(f"--lock-{tower}-unlocked-groups needs --lock-{tower}")
    report = {s.strip() for s in args.report_to.split(",") if s.strip()}
    if "all" in report:
        report = {"tensorboard", "wandb"}
    unknown = report - {"tensorboard", "wandb"}
    if unknown:
        raise InputError(
            f"--report-to: unknown target(s) {sorted(unknown)} (use tensorboard, wandb or all)"
        )
    args.report = report
    if args.resume == "latest" and args.name is None:
        raise InputError(
            "--resume latest needs --name (the run whose newest checkpoint to continue)"
        )
    if args.name is None:
        args.name = default_run_name(args)
    return args
