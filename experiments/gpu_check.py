"""The checks of scripts/gpu_check.py: every CUDA path of the project in one run, each timed, with one key number.

On one 80 GB GPU the whole list is meant to take at most 8 minutes: the demo's quick world (built on the
CPU, or taken from the demo's cache) and its tiny-rn backbone (the cached one, or pre-trained on the
GPU); feature extraction at every precision with the recall difference on the world's test split; an
AGREE step (all six terms) of ViT-B/32 and ViT-L/14 from random weights with each memory lever and its
peak memory; NCCL with one process (collectives and a DDP step); fused AdamW against foreach AdamW;
the large-gallery top-k with the torch backend against numpy; a step under --torchcompile against the
eager step. Each check runs whatever happened to the others; a failed one records its error.

With `--device cpu` the checks that can run on a CPU run at toy sizes (the others are skipped, with
the reason): a dry run of the same code, for the tests.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from agree.io import write_json
from agree.layout import Layout
from agree.metrics import retrieval_row
from clip.clip import create_model
from eval.array_ops import NumpyOps, TorchOps
from eval.feature_io import Features, read_features
from eval.metrics import recall
from eval.predictions import as_ranked_lists
from eval.topk import topk_lists
from experiments.demo import (
    PRESETS,
    Recipe,
    backbone_path,
    build_world,
    pretrain_argv,
    with_overrides,
)
from experiments.measure import EvalSplit, test_split
from training import main_all
from training.distributed import DistEnv
from training.engine import build_optimizer
from training.memory_probe import CUDA_LEVERS, LEVERS, measure
from training.params import parse_args
from training.synthetic_batch import make_batch
from training.terms import AGREE_TERMS
from training.train import StepConfig, compute_loss, train_step

OK, FAIL, SKIP = "ok", "fail", "skip"
GB = 1e9
TIME_GOAL_S = 8 * 60  # on one 80 GB GPU
EXTRACTION_PRECISIONS = ("fp32", "amp", "fp16", "bf16", "amp_bf16")
STEP_LEVERS = {**LEVERS, "lock-text": ["--lock-text"], **CUDA_LEVERS}


@dataclass(frozen=True)
class Sizes:
    """How large each check runs."""

    recipe: Recipe  # the demo world and backbone the extraction checks use
    step_models: tuple[tuple[str, int], ...]  # (model, examples per step) of the AGREE steps
    compiled: tuple[str, int]  # (model, examples per step) of the --torchcompile step
    topk: tuple[int, int, int]  # queries, items, dimension of the top-k check
    batch: int  # images / captions per forward pass in extraction


GPU_SIZES = Sizes(
    recipe=PRESETS["quick"],
    step_models=(("ViT-B-32", 32), ("ViT-L-14", 8)),
    compiled=("ViT-B-32", 32),
    topk=(20_000, 100_000, 64),
    batch=250,
)
CPU_SIZES = Sizes(  # a dry run of the same code on the CPU, in seconds
    recipe=with_overrides(
        PRESETS["quick"],
        train_images=24,
        train_captions=2,
        val_images=8,
        test_images=12,
        twin_pairs=3,
        vg_per_object=2,
        pretrain_images=48,
        pretrain_epochs=1,
        pretrain_batch=16,
        pretrain_warmup=2,
    ),
    step_models=(("tiny", 4),),
    compiled=("tiny", 4),
    topk=(300, 2000, 16),
    batch=16,
)


@dataclass
class Context:
    """What the checks share: device, sizes, folders, and results one check leaves for another."""

    device: torch.device
    sizes: Sizes
    cache: Path  # the demo's cache (worlds, CPU-trained backbones)
    work: Path  # this run's scratch folder (deleted by the caller)
    memo: dict = field(default_factory=dict)

    @property
    def on_cuda(self) -> bool:
        """True on a CUDA device."""
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Check:
    """One check: its name, what it runs (-> key number as text, details), why it is skipped on a CPU."""

    name: str
    run: Callable[[Context], tuple[str, dict]]
    cuda_only: str = ""  # the reason it is skipped on a CPU; empty: it runs there too


@dataclass
class Result:
    """One row of the table."""

    check: str
    status: str  # ok, fail or skip
    seconds: float
    key: str  # the key number, as text
    details: dict = field(default_factory=dict)
    error: str = ""


# ---------------------------------------------------------------- the checks
def _world_and_backbone(ctx: Context) -> tuple[str, dict]:
    """The demo's world (cached) and a backbone: the demo's cached one, else pre-trained on the device."""
    recipe = ctx.sizes.recipe
    world = build_world(ctx.cache, recipe)
    cached = backbone_path(ctx.cache, recipe)
    if cached.is_file():
        path, how = cached, "the demo's cached backbone"
    else:
        workers = "--workers=4" if ctx.on_cuda else "--workers=0"
        main_all.main(
            pretrain_argv(recipe, world, ctx.work / "pretrain")
            + ["--nproc=1", f"--device={ctx.device}", workers, "--log-every-n-steps=1000"]
        )
        path = ctx.work / "pretrain" / "pretrain" / "checkpoints"
        path = path / f"epoch_{recipe.pretrain_epochs}.pt"
        how = f"backbone pre-trained on {ctx.device}"
    ctx.memo.update(world=world, backbone=path)
    split = test_split(Layout.under(world))
    return (
        f"{how}; test split {len(split.i2t_gt)} images x {split.caps_per_image} captions",
        {"world": str(world), "backbone": str(path), "model": recipe.model},
    )


def recall_row(split: EvalSplit, text: Features, image: Features) -> dict[str, float]:
    """R@1/5/10 both ways and RSUM of plain top-10 retrieval with these features (numpy)."""
    t2i, i2t = topk_lists(NumpyOps(), text, image, 10, 1000)
    return retrieval_row(
        recall(split.t2i_gt, as_ranked_lists("<t2i>", "query_id", t2i)),
        recall(split.i2t_gt, as_ranked_lists("<i2t>", "image_id", i2t)),
    )


def _extraction(precision: str) -> Callable[[Context], tuple[str, dict]]:
    def check(ctx: Context) -> tuple[str, dict]:
        """eval/extract_features.py at `precision` on the test split; recall and features vs fp32."""
        from eval import extract_features

        if "backbone" not in ctx.memo:
            raise RuntimeError("needs the world and backbone of the first check, which failed")
        lay = Layout.under(ctx.memo["world"])
        out = ctx.work / f"extract-{precision}"
        out.mkdir(parents=True, exist_ok=True)
        b = str(ctx.sizes.batch)
        extract_features.main(
            [
                "--extract-image-feats",
                "--extract-text-feats",
                f"--image-data={lay.test_npz}",
                f"--text-data={lay.test_texts}",
                f"--img-batch-size={b}",
                f"--text-batch-size={b}",
                f"--resume={ctx.memo['backbone']}",
                f"--image-feat-output-path={out / 'img.npy'}",
                f"--text-feat-output-path={out / 'txt.npy'}",
                f"--model={ctx.sizes.recipe.model}",
                f"--device={ctx.device}",
                f"--precision={precision}",
            ]
        )
        image, text = (
            read_features(out / "img.npy", "image_id"),
            read_features(out / "txt.npy", "query_id"),
        )
        row = recall_row(test_split(lay), text, image)
        ctx.memo[f"extraction {precision}"] = (row, image.data, text.data)
        details: dict = {"recall": row}
        key = f"RSUM {row['rsum']:.2f}"
        ref = ctx.memo.get("extraction fp32")
        if precision != "fp32" and ref is not None:
            diff = max(
                float(np.abs(image.data - ref[1]).max()), float(np.abs(text.data - ref[2]).max())
            )
            details["rsum_minus_fp32"] = row["rsum"] - ref[0]["rsum"]
            details["max_abs_feature_diff_vs_fp32"] = diff
            key += f" ({row['rsum'] - ref[0]['rsum']:+.2f} vs fp32; features within {diff:.1e})"
        return key, details

    return check


def _step(model: str, batch: int, lever: str) -> Callable[[Context], tuple[str, dict]]:
    def check(ctx: Context) -> tuple[str, dict]:
        """Two AGREE steps (all six terms) from random weights with the lever's flags; peak memory."""
        r = measure(model, batch, STEP_LEVERS[lever], str(ctx.device))
        if not all(math.isfinite(v) for v in r["losses"]):
            raise RuntimeError(f"non-finite loss {r['losses']}")
        ctx.memo[f"losses {model} {lever} {batch}"] = r["losses"]
        peak = "peak" if ctx.on_cuda else "process peak RSS"
        return (
            f"{peak} {r['peak'] / GB:.2f} GB, {r['seconds_per_step']:.2f} s/step, batch {batch}",
            {**r, "batch": batch, "flags": STEP_LEVERS[lever]},
        )

    return check


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group(ctx: Context) -> tuple[str, dict]:
    """One process: all_gather, all_reduce, and a DDP step equal to the same step without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if ctx.on_cuda else "gloo"
    if ctx.on_cuda:
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        x = torch.arange(8.0, device=ctx.device)
        parts = [torch.empty_like(x)]
        dist.all_gather(parts, x)
        y = x.clone()
        dist.all_reduce(y)
        if not (torch.equal(parts[0], x) and torch.equal(y, x)):
            raise RuntimeError("all_gather / all_reduce changed the values of one process")
        torch.manual_seed(0)
        model = create_model("tiny", device=ctx.device).train()
        plain = copy.deepcopy(model)
        ids = [ctx.device] if ctx.on_cuda else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        batch = make_batch(4, 64)
        losses = []
        for m, env in (
            (ddp, DistEnv(device=ctx.device, distributed=True)),
            (plain, DistEnv(device=ctx.device)),
        ):
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            losses.append(train_step(m, batch, opt, None, StepConfig(AGREE_TERMS, env))["loss"])
        diff = max(
            (a - b).abs().max().item() for a, b in zip(model.parameters(), plain.parameters())
        )
        if abs(losses[0] - losses[1]) > 1e-5 * abs(losses[1]) or diff > 1e-5:
            raise RuntimeError(f"DDP step differs: losses {losses}, parameters within {diff:.1e}")
    finally:
        dist.destroy_process_group()
    return (
        f"{backend}: all_gather, all_reduce; DDP step loss {losses[0]:.4f} = {losses[1]:.4f} without",
        {"backend": backend, "losses": losses, "max_param_diff": diff},
    )


def _fused_adamw(ctx: Context) -> tuple[str, dict]:
    """build_optimizer's fused AdamW on CUDA parameters against foreach AdamW, same gradients, 3 steps."""
    torch.manual_seed(0)
    model = create_model("tiny", device=ctx.device).train()
    twin = copy.deepcopy(model)
    args = parse_args(["--train-data", "unused.jsonl", "--model", "tiny"])
    fused = build_optimizer(model, args)
    if not all(g.get("fused") for g in fused.param_groups):
        raise RuntimeError("build_optimizer did not build a fused AdamW for CUDA parameters")
    ref_groups = build_optimizer(twin, args).param_groups
    ref = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in ref_groups],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        foreach=True,
    )
    cfg = StepConfig(AGREE_TERMS, DistEnv(device=ctx.device))
    batch = make_batch(4, 64)
    for _ in range(3):
        fused.zero_grad(set_to_none=True)
        total, _ = compute_loss(model, batch, cfg)
        total.backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        fused.step()
        ref.step()
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    if diff > 1e-5:
        raise RuntimeError(f"fused and foreach AdamW differ by {diff:.1e}")
    return f"max |param difference| {diff:.1e} vs foreach after 3 steps", {"max_param_diff": diff}


def _topk(ctx: Context) -> tuple[str, dict]:
    """Top-10 both ways with the torch backend on the device against numpy: equal lists. Integer-valued
    features make every score exact on both (so ties are real ties, broken by the lower index)."""
    nq, ni, d = ctx.sizes.topk
    rng = np.random.default_rng(0)
    text = rng.integers(-3, 4, (nq, d)).astype(np.float32)
    image = rng.integers(-3, 4, (ni, d)).astype(np.float32)
    t = Features(Path("<queries>"), "query_id", list(range(nq)), text)
    i = Features(Path("<items>"), "image_id", [str(k) for k in range(ni)], image)
    t0 = time.perf_counter()
    want = topk_lists(NumpyOps(), t, i, 10, 256)
    t_numpy = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = topk_lists(TorchOps(ctx.device), t, i, 10, 256)
    if ctx.on_cuda:
        torch.cuda.synchronize(ctx.device)
    t_torch = time.perf_counter() - t0
    differ = [
        sum(a != b for a, b in zip(g, w)) for g, w in zip(got, want)
    ]  # rows that differ, per direction
    if any(differ):
        raise RuntimeError(f"torch and numpy lists differ in {differ} rows (T2I, I2T)")
    scores = text[:100] @ image.T
    tenth = np.sort(scores, axis=1)[:, -10]
    tied = int(((scores == tenth[:, None]).sum(axis=1) > 1).sum())
    return (
        f"{nq:,} x {ni:,}: equal lists both ways; torch {t_torch:.1f} s, numpy {t_numpy:.1f} s",
        {
            "queries": nq,
            "items": ni,
            "dim": d,
            "torch_seconds": t_torch,
            "numpy_seconds": t_numpy,
            "rows_of_100_with_a_tie_at_rank_10": tied,
        },
    )


def _compiled_step(ctx: Context) -> tuple[str, dict]:
    """Two AGREE steps of a model under --torchcompile (inductor) against the same steps without it."""
    model, batch = ctx.sizes.compiled
    eager = (
        ctx.memo.get(f"losses {model} plain {batch}")
        or measure(model, batch, [], str(ctx.device))["losses"]
    )
    t0 = time.perf_counter()
    r = measure(model, batch, ["--torchcompile"], str(ctx.device))
    seconds = time.perf_counter() - t0
    diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], eager))
    if diff > 1e-3:
        raise RuntimeError(f"compiled losses {r['losses']} differ from eager {eager}")
    return (
        f"{model}: losses within {diff:.1e} of eager; {seconds:.0f} s with compilation, "
        f"peak {r['peak'] / GB:.2f} GB",
        {**r, "eager_losses": eager, "batch": batch},
    )


def checks(sizes: Sizes) -> list[Check]:
    """Every check, in the order they run (later ones read what earlier ones leave in the context)."""
    out = [Check("demo world + backbone", _world_and_backbone)]
    for p in EXTRACTION_PRECISIONS:
        why = "fp16 autocast is CUDA only (amp runs in fp32 on the CPU)" if p == "amp" else ""
        out.append(Check(f"extraction {p}", _extraction(p), why))
    for model, batch in sizes.step_models:
        for lever in STEP_LEVERS:
            why = "fp16 training needs CUDA" if lever in CUDA_LEVERS else ""
            out.append(Check(f"AGREE step {model} {lever}", _step(model, batch, lever), why))
    out += [
        Check("process group, one process (NCCL; gloo on the CPU)", _process_group),
        Check("fused AdamW", _fused_adamw, "build_optimizer fuses AdamW for CUDA parameters only"),
        Check("top-k, torch backend vs numpy", _topk),
        Check(
            "--torchcompile step",
            _compiled_step,
            "inductor compiles C++ kernels on the CPU: 79 s per step of the tiny model on 2 cores "
            "(tests/test_train_compile.py runs the flag with aot_eager)",
        ),
    ]
    return out


def select(all_checks: Sequence[Check], only: Sequence[str]) -> list[Check]:
    """The checks whose name starts with one of `only` (all of them when `only` is empty)."""
    return [c for c in all_checks if not only or any(c.name.startswith(o) for o in only)]


# ---------------------------------------------------------------- running and reporting
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".strip()


def _release_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.on_cuda:
        torch.cuda.empty_cache()


def run_checks(
    selected: Sequence[Check], ctx: Context, report: Optional[Callable[[Result], None]] = None
) -> list[Result]:
    """Run every check (a failure or exception is recorded and the next one runs); `report` sees each result."""
    results = []
    for c in selected:
        t0 = time.perf_counter()
        if c.cuda_only and not ctx.on_cuda:
            r = Result(c.name, SKIP, 0.0, c.cuda_only)
        else:
            try:
                key, details = c.run(ctx)
                r = Result(c.name, OK, 0.0, key, details)
            except Exception as e:  # noqa: BLE001 - every check runs whatever the others do
                r = Result(c.name, FAIL, 0.0, _first_line(e), error=traceback.format_exc(limit=8))
        r.seconds = round(time.perf_counter() - t0, 2)
        _release_memory(ctx)
        results.append(r)
        if report is not None:
            report(r)
    return results


def passed(results: Sequence[Result]) -> bool:
    """True when no check failed (skipped ones count as passed)."""
    return all(r.status != FAIL for r in results)


def table(results: Sequence[Result]) -> str:
    """The markdown table: check, status, seconds, key number."""
    lines = ["| check | status | seconds | key number |", "|---|---|---:|---|"]
    for r in results:
        key = r.key.replace("|", "/")
        lines.append(f"| {r.check} | {r.status} | {r.seconds:.1f} | {key} |")
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    """The device, torch and CUDA versions, in words."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = "CPU (dry run at toy sizes)"
    return f"{what}; torch {torch.__version__}"


def write_results(
    path: Path, results: Sequence[Result], device: torch.device, argv: list[str]
) -> None:
    """The results as JSON (atomically): device, command, total seconds, passed, one record per check."""
    write_json(
        path,
        {
            "device": device_description(device),
            "command": argv,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(sum(r.seconds for r in results), 1),
            "time_goal_seconds": TIME_GOAL_S,
            "passed": passed(results),
            "checks": [asdict(r) for r in results],
        },
    )


def read_results(path: Path) -> dict:
    """A JSON file written by write_results."""
    return json.loads(Path(path).read_text())
