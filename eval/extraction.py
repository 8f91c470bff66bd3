"""Feature extraction with CLIP: model loading, batched image / text / entity-slot encoding (docs/method.md §5.1)."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from agree.entities import EVAL_SLOTS, PROMPT_TEMPLATE, entity_slots
from agree.images import ImageArchive
from agree.io import InputError, iter_jsonl
from agree.precision import autocast, resolve_device, resolve_precision, weight_dtype
from agree.pretrained import clip_errors_as_input_errors, load_pretrained
from clip.clip import create_model, load_state_dict_into, read_checkpoint, tokenize
from clip.model import CLIP, convert_weights
from eval.distributed import Shard, close_shard, init_shard, rows_in_order, run_everywhere
from eval.feature_io import FeatureWriter

DEFAULT_PRECISION_ON_CUDA = (
    "fp32"  # without --precision, as the release extracts; fp32 on the CPU too
)


# ---------------------------------------------------------------- models


def resolve_extraction_precision(requested: str | None, device: torch.device) -> str:
    """--precision of the extraction scripts: fp32 unless asked (see agree.precision.resolve_precision).

    Unlike training, extraction accepts fp16 on the CPU (half weights and activations; torch runs
    CLIP's ops in half on the CPU, slowly): it measures what fp16 does to the features without a GPU.
    """
    if requested == "fp16" and device.type != "cuda":
        logging.warning(
            "--precision fp16 on the CPU: half-precision weights (slow; meant to measure its effect)"
        )
        return "fp16"
    return resolve_precision(requested, device, default_on_cuda=DEFAULT_PRECISION_ON_CUDA)


# What each --precision computes, and how it relates to the release's extraction scripts, whose
# --precision amp (their default) loads fp32 weights and runs without autocast, i.e. this project's fp32.
PRECISION_NOTES = {
    "fp32": "fp32 weights and activations: the release's extraction with its default --precision amp "
    "(fp32 weights, no autocast) or fp32",
    "amp": "fp32 weights, fp16 autocast: fp16 features, NOT the release's --precision amp (fp32 weights "
    "without autocast; --precision fp32 gives those)",
    "fp16": "fp16 weights and activations: the release's --precision fp16",
    "bf16": "bfloat16 weights and activations (the release has no bf16)",
    "amp_bf16": "fp32 weights, bfloat16 autocast (the release has no bf16)",
}


def describe_precision(precision: str, device: torch.device) -> str:
    """The line the extraction scripts print about the precision they run in."""
    return f"extraction precision: {precision} on {device}: {PRECISION_NOTES[precision]}"


def _place(model: CLIP, device: torch.device, precision: str) -> CLIP:
    """Move to `device`; fp16 / bf16 weights for 'fp16' / 'bf16', fp32 otherwise; eval mode."""
    model = model.to(device).eval()
    if precision in ("fp16", "bf16"):
        convert_weights(model, weight_dtype(precision))
    return model


def load_finetuned(
    resume: str | os.PathLike, model_name: Optional[str], device: torch.device, precision: str
) -> CLIP:
    """Model of config `model_name` (None: the config the training checkpoint records) with the weights
    of a training checkpoint (or any CLIP state dict)."""
    with clip_errors_as_input_errors():
        state_dict, recorded = read_checkpoint(resume)
        if model_name is None:
            if recorded is None:
                raise InputError(
                    f"--resume: {resume} records no model config; pass --model (the config it was "
                    "trained with, e.g. ViT-L-14)"
                )
            model_name = recorded
            print(f"--model {model_name} (recorded in {resume})", flush=True)
        model = create_model(model_name, device="cpu", precision="fp32")
        load_state_dict_into(model, state_dict, resume)
    return _place(model, device, precision)


def load_zero_shot(
    resume: str | os.PathLike,
    model_name: str | None,
    device: torch.device,
    precision: str,
    jit: bool = False,
) -> CLIP:
    """A pre-trained checkpoint (TorchScript archive or state dict); `model_name`, if given, must fit its
    weights and gives the activation (e.g. ViT-B-32-gelu for OpenCLIP's GELU models). `jit`: torch.jit.load."""
    model, _, _ = load_pretrained(
        resume, device="cpu", precision="fp32", jit=jit, model_name=model_name or None
    )
    return _place(model, device, precision)


def _normalised(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True)).cpu().numpy()


# ---------------------------------------------------------------- images


class _ArchiveImages(Dataset):
    """Images of an archive as model inputs; errors travel back as strings (no worker tracebacks)."""

    def __init__(self, archive: ImageArchive, keys: Sequence[str], resolution: int):
        self.archive, self.keys, self.resolution = archive, list(keys), resolution

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        try:
            return self.archive.load_tensor(self.keys[i], self.resolution)
        except InputError as e:
            return str(e)


def _collate(batch: list):
    errors = [b for b in batch if isinstance(b, str)]
    return errors[0] if errors else torch.stack(batch)


def open_images(path: str | os.PathLike) -> ImageArchive:
    """Open an image archive; it must hold at least one image."""
    archive = ImageArchive(path)
    if len(archive) == 0:
        raise InputError(f"{path}: image archive is empty")
    return archive


def encode_images(
    model: CLIP,
    archive: ImageArchive,
    batch_size: int,
    device: torch.device,
    precision: str | None,
    workers: int = 0,
    keys: Sequence[str] | None = None,
    progress: bool = True,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (npz keys, L2-normalised float32 features) batch by batch, in archive order (or of `keys`).

    Images are read lazily."""
    keys = archive.keys() if keys is None else list(keys)
    loader = DataLoader(
        _ArchiveImages(archive, keys, model.visual.input_resolution),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    start = 0
    with torch.no_grad(), autocast(precision, device):
        for batch in tqdm(
            loader, desc="images", unit="batch", dynamic_ncols=True, disable=not progress
        ):
            if isinstance(batch, str):
                raise InputError(batch)
            feats = model.encode_image(batch.to(device=device, dtype=model.dtype))
            yield keys[start : start + len(batch)], _normalised(feats)
            start += len(batch)


# ---------------------------------------------------------------- texts


@dataclass
class Query:
    """One test caption: id as given, text, textual entities (segs file only)."""

    id: object
    text: str
    items: list[str]


def read_queries(path: str | os.PathLike, with_items: bool = False) -> list[Query]:
    """Test captions (`query_id`, `query_text`[, `items`]); errors name file and line."""
    required = ("query_id", "query_text") + (("items",) if with_items else ())
    out: list[Query] = []
    seen: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path, required=required):
        text = rec["query_text"]
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: 'query_text' must be a string")
        items = rec.get("items", []) if with_items else []
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise InputError(f"{path}:{lineno}: 'items' must be a list of strings")
        qid = rec["query_id"]
        if str(qid) in seen:
            raise InputError(
                f"{path}:{lineno}: duplicate query_id {qid!r} (first on line {seen[str(qid)]})"
            )
        seen[str(qid)] = lineno
        out.append(Query(qid, text, items))
    if not out:
        raise InputError(f"{path}: no queries (file is empty)")
    return out


def encode_texts(
    model: CLIP, texts: Sequence[str], device: torch.device, precision: str | None
) -> np.ndarray:
    """L2-normalised float32 features of `texts` in one forward pass (repeated texts encoded once)."""
    unique = list(dict.fromkeys(texts))
    tokens = tokenize(unique, context_length=model.context_length).to(device)
    with torch.no_grad(), autocast(precision, device):
        feats = _normalised(model.encode_text(tokens))
    if len(unique) == len(texts):
        return feats
    where = {t: i for i, t in enumerate(unique)}
    return feats[[where[t] for t in texts]]


def batches(seq: Sequence, size: int, desc: str, progress: bool = True) -> Iterator[Sequence]:
    """Consecutive slices of `seq` with a tqdm progress bar."""
    for start in tqdm(
        range(0, len(seq), size), desc=desc, unit="batch", dynamic_ncols=True, disable=not progress
    ):
        yield seq[start : start + size]


def check_batch_size(name: str, value: int) -> int:
    """A batch size flag must be positive."""
    if value < 1:
        raise InputError(f"{name} must be at least 1, got {value}")
    return value


def require_paths(**paths: str | None) -> None:
    """Every named flag must be given (InputError naming the missing ones)."""
    missing = [name for name, value in paths.items() if not value]
    if missing:
        raise InputError(f"missing {', '.join('--' + m.replace('_', '-') for m in missing)}")


def output_dir_ok(*paths: str | None) -> None:
    """Fail early (before the slow part) when an output's folder cannot be created."""
    for p in paths:
        if p:
            try:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InputError(f"cannot create the folder of {p}: {e}") from None


# ---------------------------------------------------------------- whole runs


@dataclass
class ExtractionPlan:
    """What one extraction run reads and writes (validated before the model is loaded)."""

    archive: ImageArchive | None = None
    image_out: str | None = None
    queries: list[Query] | None = None
    text_out: str | None = None
    slot_queries: list[Query] | None = None
    prompt_out: str | None = None
    mask_out: str | None = None
    n_slots: int = EVAL_SLOTS
    template: str = PROMPT_TEMPLATE


def plan_extraction(args, slots: bool = False) -> ExtractionPlan:
    """Check the flags and read the (small) caption files; open the image archive lazily."""
    plan = ExtractionPlan()
    want_prompt = slots and args.extract_prompt_feats
    want_mask = slots and args.extract_mask_feats
    if not (args.extract_image_feats or args.extract_text_feats or want_prompt or want_mask):
        flags = "--extract-image-feats, --extract-text-feats" + (
            ", --extract-prompt-feats, --extract-mask-feats" if slots else ""
        )
        raise InputError(f"nothing to extract: give at least one of {flags}")
    for name in (
        "img_batch_size",
        "text_batch_size",
    ):  # the release's two names, or --eval-batch-size
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(args, "eval_batch_size", 32))
    check_batch_size("--img-batch-size", args.img_batch_size)
    check_batch_size("--text-batch-size", args.text_batch_size)
    if args.extract_image_feats:
        require_paths(
            image_data=args.image_data, image_feat_output_path=args.image_feat_output_path
        )
        plan.archive, plan.image_out = open_images(args.image_data), args.image_feat_output_path
    if args.extract_text_feats:
        require_paths(text_data=args.text_data, text_feat_output_path=args.text_feat_output_path)
        plan.queries, plan.text_out = read_queries(args.text_data), args.text_feat_output_path
    if want_prompt or want_mask:
        if args.slots < 1:
            raise InputError(f"--slots must be at least 1, got {args.slots}")
        if "{}" not in args.prompt_template:
            raise InputError(f"--prompt-template must contain {{}} (got {args.prompt_template!r})")
        require_paths(prompt_data=args.prompt_data)
        if want_prompt:
            require_paths(prompt_feat_output_path=args.prompt_feat_output_path)
            plan.prompt_out = args.prompt_feat_output_path
        if want_mask:
            require_paths(mask_feat_output_path=args.mask_feat_output_path)
            plan.mask_out = args.mask_feat_output_path
        plan.slot_queries = read_queries(args.prompt_data, with_items=True)
        plan.n_slots, plan.template = args.slots, args.prompt_template
    output_dir_ok(plan.image_out, plan.text_out, plan.prompt_out, plan.mask_out)
    return plan


def run_extraction(
    plan: ExtractionPlan,
    model: CLIP,
    args,
    device: torch.device,
    precision: str,
    shard: Shard | None = None,
) -> None:
    """Encode and write everything in `plan`; the output files appear together at the end, or none.

    With several ranks (`shard`), each encodes its run of whole batches and rank 0 writes the files.
    """
    shard = shard or Shard()
    dim = int(model.text_projection.shape[1])
    if shard.world > 1:
        spans = [
            (what, len(items), size)
            for what, items, size in (
                (
                    "images",
                    plan.archive.keys() if plan.archive is not None else None,
                    args.img_batch_size,
                ),
                ("captions", plan.queries, args.text_batch_size),
                ("entity slots", plan.slot_queries, args.text_batch_size),
            )
            if items is not None
        ]
        print(
            f"rank {shard.rank} of {shard.world} encodes "
            + ", ".join(
                "{} [{}, {})".format(what, *shard.span(n, size)) for what, n, size in spans
            ),
            flush=True,
        )
    with contextlib.ExitStack() as outputs:

        def writer(path: str | None, key: str, slots: bool = False) -> FeatureWriter | None:
            return (
                outputs.enter_context(FeatureWriter(path, key, slots))
                if path and shard.is_writer
                else None
            )

        if plan.archive is not None:
            w = writer(plan.image_out, "image_id")
            keys = plan.archive.keys()
            lo, hi = shard.span(len(keys), args.img_batch_size)
            blocks = (
                f
                for _, f in encode_images(
                    model,
                    plan.archive,
                    args.img_batch_size,
                    device,
                    precision,
                    args.workers,
                    keys[lo:hi],
                    shard.is_writer,
                )
            )
            for start, rows in rows_in_order(
                shard, device, blocks, len(keys), args.img_batch_size, (dim,)
            ):
                w.add(keys[start : start + len(rows)], rows)
        if plan.queries is not None:
            w = writer(plan.text_out, "query_id")
            ids = [q.id for q in plan.queries]
            lo, hi = shard.span(len(ids), args.text_batch_size)
            blocks = (
                encode_texts(model, [q.text for q in batch], device, precision)
                for batch in batches(
                    plan.queries[lo:hi], args.text_batch_size, "captions", shard.is_writer
                )
            )
            for start, rows in rows_in_order(
                shard, device, blocks, len(ids), args.text_batch_size, (dim,)
            ):
                w.add(ids[start : start + len(rows)], rows)
        if plan.slot_queries is not None:
            wp = writer(plan.prompt_out, "query_id", slots=True)
            wm = writer(plan.mask_out, "query_id", slots=True)
            s, qs = plan.n_slots, plan.slot_queries
            sets = [
                name
                for name, out in (("prompts", plan.prompt_out), ("masked", plan.mask_out))
                if out
            ]
            slots = [entity_slots(q.text, q.items, s, plan.template) for q in qs]
            ids, n_real = [q.id for q in qs], [x.n_real for x in slots]
            lo, hi = shard.span(len(qs), args.text_batch_size)

            def slot_blocks() -> Iterator[np.ndarray]:
                for b0 in batches(
                    range(lo, hi), args.text_batch_size, "entity slots", shard.is_writer
                ):
                    # every prompt and mask slot of the batch in one forward pass
                    texts = [t for j in b0 for name in sets for t in getattr(slots[j], name)]
                    yield encode_texts(model, texts, device, precision).reshape(
                        len(b0), len(sets), s, -1
                    )

            for start, rows in rows_in_order(
                shard, device, slot_blocks(), len(qs), args.text_batch_size, (len(sets), s, dim)
            ):
                part = slice(start, start + len(rows))
                if wp:
                    wp.add(ids[part], rows[:, 0], n_real[part])
                if wm:
                    wm.add(ids[part], rows[:, -1], n_real[part])


def extract(args, load: Callable[[torch.device, str], CLIP], slots: bool = False) -> None:
    """An extraction script's run: device and precision, plan and model `load(device, precision)` (on every
    rank, so that a bad input stops all of them), then encode and write (sharded under torchrun)."""
    shard, device = init_shard(
        resolve_device(args.device)
    )  # under torchrun: this rank's share and device
    try:
        precision = resolve_extraction_precision(args.precision, device)
        if shard.is_writer:
            print(describe_precision(precision, device), flush=True)
        plan, model = run_everywhere(
            shard, device, lambda: (plan_extraction(args, slots=slots), load(device, precision))
        )
        run_extraction(plan, model, args, device, precision, shard)
    finally:
        close_shard(shard)
