"""Putting a run together: run directory, model, optimiser, data, resume, the epoch loop, checkpoints."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from agree.io import InputError, atomic_write
from agree.precision import resolve_precision
from agree.pretrained import clip_errors_as_input_errors, default_checkpoint, load_pretrained
from clip.clip import create_model
from clip.model import convert_weights
from training import checkpoint as ckpt_io
from training.data import check_files, resolve_paths
from training.dataset import load_train_inputs, make_train_loader
from training.distributed import (
    SPAWN,
    DistEnv,
    LaunchPlan,
    barrier,
    cleanup,
    init_distributed,
    unwrap,
)
from training.logger import close_logging, setup_logging
from training.scheduler import constant_lr, cosine_lr
from training.terms import enabled_terms
from training.train import StepConfig, TrainContext, train_one_epoch
from training.validation import ValData, evaluate, load_val

NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")


@dataclass
class RunResult:
    """What a finished run leaves behind (for callers and tests)."""

    run_dir: Path
    history: list = field(
        default_factory=list
    )  # (global step, {term: value}) of every step run here
    val: list = field(default_factory=list)  # (epoch, metrics) after every epoch
    final_step: int = 0


def build_model(args: argparse.Namespace, device: torch.device, precision: str) -> nn.Module:
    """Random init of --model, or with --openai-pretrained the --model weights at --pretrained-path
    (OpenAI archive or OpenCLIP state dict; --model's config gives the activation; --jit: torch.jit.load);
    then the memory levers: bf16 weights, --grad-checkpointing, --lock-image / --lock-text."""
    weights = "fp16" if precision == "fp16" else "fp32"
    if args.openai_pretrained:
        path = Path(args.pretrained_path or default_checkpoint(args.model))
        if not path.is_file():
            raise InputError(
                f"--openai-pretrained: checkpoint not found: {path} (set --pretrained-path)"
            )
        try:
            model, _, _ = load_pretrained(
                path,
                device=device,
                is_train=True,
                precision=weights,
                jit=args.jit,
                model_name=args.model,
            )
        except InputError as e:
            raise InputError(f"--openai-pretrained: {e}") from None
    else:
        with clip_errors_as_input_errors():
            model = create_model(args.model, device=device, precision=weights)
    if precision == "bf16":
        convert_weights(model, torch.bfloat16)
    model.set_grad_checkpointing(args.grad_checkpointing)
    lock_towers(model, args)
    return model


def lock_towers(model: nn.Module, args: argparse.Namespace) -> None:
    """--lock-image / --lock-text: freeze a tower except its last --lock-*-unlocked-groups layer groups."""
    for tower in ("image", "text"):
        if not getattr(args, f"lock_{tower}"):
            continue
        unlocked = getattr(args, f"lock_{tower}_unlocked_groups")
        groups = model.layer_groups(tower)
        if unlocked >= len(groups):
            raise InputError(
                f"--lock-{tower}-unlocked-groups {unlocked}: the {tower} tower of {args.model} has "
                f"{len(groups)} layer groups; leave at most {len(groups) - 1} unlocked "
                f"(or drop --lock-{tower})"
            )
        (model.lock_image_tower if tower == "image" else model.lock_text_tower)(unlocked)
        frozen = sum(p.numel() for g in groups[: len(groups) - unlocked] for p in g)
        logging.info(
            "--lock-%s: %d of %d layer groups frozen (%.1fM parameters)",
            tower,
            len(groups) - unlocked,
            len(groups),
            frozen / 1e6,
        )


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW: no weight decay for bn/ln/bias/logit_scale parameters, --wd for the rest."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.wd}]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    fast = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, **fast
    )


def write_params(args: argparse.Namespace, path: Path) -> None:
    """params.txt: one 'name: value' line per flag, sorted."""
    lines = [f"{k}: {v}\n" for k, v in sorted(vars(args).items())]
    with atomic_write(path, "w") as f:
        f.writelines(lines)


def _resume_path(args: argparse.Namespace, ckpt_dir: Path, env: DistEnv) -> Optional[Path]:
    """The checkpoint to continue from: --resume PATH, or with --resume latest the newest one of the run
    (rank 0 looks, every rank takes its answer), None when the run has none yet (a new run, as OpenCLIP)."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        found = ckpt_io.find_latest(ckpt_dir) if env.is_master else None
        found = broadcast_from_master(env, None if found is None else str(found))
        return None if found is None else Path(found)
    return Path(args.resume)


def broadcast_from_master(env: DistEnv, value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object; the value itself in one process)."""
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reporters(args: argparse.Namespace, run_dir: Path, env: DistEnv) -> tuple[Any, Any]:
    writer = wandb = None
    if not env.is_master:
        return None, None
    if "tensorboard" in args.report:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    if "wandb" in args.report:
        import wandb as wandb_module

        wandb = wandb_module
        wandb.init(
            project="agree",
            name=args.name,
            notes=args.wandb_notes,
            config=vars(args),
            dir=str(run_dir),
        )
    return writer, wandb


def _restore(path: Path, args: argparse.Namespace, ctx: TrainContext) -> int:
    """Load model, optimiser, scaler and RNG state from a checkpoint; return the step to continue at."""
    ckpt = ckpt_io.load_checkpoint(path)
    try:
        unwrap(ctx.model).load_state_dict(ckpt_io.strip_module_prefix(ckpt["state_dict"]))
        if "optimizer" in ckpt:
            ctx.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(
            f"--resume: {path} does not fit --model {args.model} "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if ctx.scaler is not None and ckpt.get("scaler"):
        ctx.scaler.load_state_dict(ckpt["scaler"])
    start_step = int(ckpt.get("step", ckpt.get("epoch", 0) * ctx.steps_per_epoch))
    if ckpt.get("steps_per_epoch", ctx.steps_per_epoch) != ctx.steps_per_epoch:
        logging.warning(
            "checkpoint was written with %s steps per epoch, this run has %d",
            ckpt.get("steps_per_epoch"),
            ctx.steps_per_epoch,
        )
    ckpt_io.set_rng_state(ckpt.get("rng"))
    logging.info(
        "resumed from %s at step %d (epoch %d)", path, start_step, start_step // ctx.steps_per_epoch
    )
    return start_step


def _checkpoint(args: argparse.Namespace, ctx: TrainContext, epochs_done: int, step: int) -> dict:
    """Everything a resumed run needs (loads with torch.load(weights_only=True))."""
    return {
        "epoch": epochs_done,
        "step": step,
        "steps_per_epoch": ctx.steps_per_epoch,
        "name": args.name,
        "model": args.model,
        "state_dict": unwrap(ctx.model).state_dict(),
        "optimizer": ctx.optimizer.state_dict(),
        "scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        "rng": ckpt_io.rng_state(),
        "args": {k: v for k, v in vars(args).items() if k != "report"},
    }


def _end_of_epoch(
    args: argparse.Namespace,
    ctx: TrainContext,
    val: Optional[ValData],
    ckpt_dir: Path,
    epochs_done: int,
    step: int,
    result: RunResult,
) -> None:
    """Rank 0: validation, then epoch_N.pt / epoch_latest.pt as the save flags ask."""
    if val is not None:
        metrics = evaluate(
            ctx.model,
            val,
            unwrap(ctx.model).visual.input_resolution,
            args.eval_batch_size,
            args.workers,
            ctx.cfg.env.device,
            ctx.cfg.precision,
        )
        result.val.append((epochs_done, metrics))
        logging.info(
            "Eval Epoch: %d %s", epochs_done, " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )
        if ctx.writer is not None:
            for k, v in metrics.items():
                ctx.writer.add_scalar(f"val/{k}", v, step)
        if ctx.wandb is not None:
            ctx.wandb.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    saved = None
    last = args.stop_after_epoch or args.epochs
    if args.save_frequency > 0 and (epochs_done % args.save_frequency == 0 or epochs_done == last):
        saved = ckpt_io.save_checkpoint(
            _checkpoint(args, ctx, epochs_done, step), ckpt_io.epoch_path(ckpt_dir, epochs_done)
        )
        logging.info("saved %s", saved)
        if args.delete_previous_checkpoint:
            gone = ckpt_io.delete_previous(ckpt_dir, epochs_done, args.save_frequency)
            if gone is not None:
                logging.info("deleted %s (--delete-previous-checkpoint)", gone)
    if args.save_most_recent or args.save_every_n_steps:
        if saved is not None:
            ckpt_io.link_or_copy(saved, ckpt_dir / ckpt_io.LATEST)
        else:
            ckpt_io.save_checkpoint(
                _checkpoint(args, ctx, epochs_done, step), ckpt_dir / ckpt_io.LATEST
            )


def _prepare_run_dir(args: argparse.Namespace, env: DistEnv) -> tuple[Path, Path, Optional[Path]]:
    """(run directory, checkpoint folder, checkpoint to resume from); a new run may not reuse a directory."""
    run_dir = Path(args.logs) / args.name
    ckpt_dir = run_dir / "checkpoints"
    if args.resume is None and (ckpt_dir.exists() or (run_dir / "out.log").exists()):
        raise InputError(
            f"--name: run directory {run_dir} already exists; choose another --name "
            "or continue it with --resume latest"
        )
    resume_path = _resume_path(args, ckpt_dir, env)
    barrier(env)
    setup_logging(run_dir / "out.log", args.debug, env.is_master, env.rank)
    if args.resume == "latest" and resume_path is None:
        logging.info("--resume latest: no checkpoint in %s yet; starting a new run", ckpt_dir)
    if env.is_master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_params(args, run_dir / "params.txt")
    return run_dir, ckpt_dir, resume_path


TORCHCOMPILE_BACKEND = "inductor"  # torch.compile's default (the tests swap in a faster one)


def compile_model(model: nn.Module, args: argparse.Namespace, env: DistEnv) -> nn.Module:
    """--torchcompile: the (DDP-wrapped) model through torch.compile, as OpenCLIP compiles it."""
    if not args.torchcompile:
        return model
    logging.info(
        "--torchcompile: torch.compile (backend %s); the first steps compile (again for each new "
        "caption length until the length is made dynamic)",
        TORCHCOMPILE_BACKEND,
    )
    if args.grad_checkpointing and env.distributed:
        # as OpenCLIP: compile with checkpointing works under DDP only without dynamo's DDP optimiser
        torch._dynamo.config.optimize_ddp = False
    return torch.compile(model, backend=TORCHCOMPILE_BACKEND)


def _wrap_distributed(model: nn.Module, args: argparse.Namespace, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return model
    if args.use_bn_sync:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_kwargs = {"device_ids": [env.device]} if env.device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def _context(
    args: argparse.Namespace,
    env: DistEnv,
    model: nn.Module,
    precision: str,
    terms: tuple[str, ...],
    run_dir: Path,
    steps_per_epoch: int,
    keep_history: bool,
) -> TrainContext:
    """Optimiser, grad scaler, lr schedule, step config and reporters around the (wrapped) model."""
    total_steps = steps_per_epoch * args.epochs
    optimizer = build_optimizer(model, args)
    writer, wandb = _reporters(args, run_dir, env)
    return TrainContext(
        model=model,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda") if precision == "amp" else None,
        set_lr=constant_lr(optimizer, args.lr)
        if args.skip_scheduler
        else cosine_lr(optimizer, args.lr, args.warmup, total_steps),
        cfg=StepConfig(
            terms=terms,
            env=env,
            precision=precision,
            aggregate=args.aggregate,
            gather_with_grad=args.gather_with_grad,
            legacy_detached_rank=args.legacy_detached_rank,
            grad_clip_norm=args.grad_clip_norm,
        ),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        end_step=steps_per_epoch * (args.stop_after_epoch or args.epochs),
        global_batch=args.batch_size * args.accum_freq * env.world_size,
        accum_freq=args.accum_freq,
        log_every=args.log_every_n_steps,
        writer=writer,
        wandb=wandb,
        history=[] if keep_history else None,
    )


def train_worker(local_rank: int, plan: LaunchPlan, args: argparse.Namespace) -> None:
    """One process of a run laid out by `plan`: join the process group, train, leave."""
    if plan.launcher == SPAWN and not plan.use_cuda and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // plan.world_size)
        )  # CPU workers share the cores
    env = init_distributed(plan, local_rank, args.device, args.dist_url, args.gpu)
    try:
        run(args, env, describe=plan.describe())
    finally:
        cleanup(env)


def run(
    args: argparse.Namespace, env: DistEnv, keep_history: bool = False, describe: str = ""
) -> RunResult:
    """Train as the flags say; rank 0 writes the run directory. `keep_history`: record every step's losses.

    `describe`: how the processes were started, for the first log line."""
    describe = describe or ("one process" if env.world_size == 1 else f"{env.world_size} processes")
    if "wandb" in args.report and importlib.util.find_spec("wandb") is None:
        raise InputError("--report-to wandb needs the wandb package (pip install wandb)")
    args.name = broadcast_from_master(
        env, args.name
    )  # a default name holds each process's start time
    terms = enabled_terms(args)
    paths = resolve_paths(args)
    check_files(args, terms, paths)
    inputs = load_train_inputs(
        args, paths, terms
    )  # every missing input is found here, before the run starts
    precision = resolve_precision(args.precision, env.device)
    ctx = None
    try:
        run_dir, ckpt_dir, resume_path = _prepare_run_dir(args, env)
        accum = f" x {args.accum_freq} micro-batches" if args.accum_freq > 1 else ""
        logging.info(
            "world size %d (%s); batch size %d per worker%s, global batch %d",
            env.world_size,
            describe,
            args.batch_size,
            accum,
            args.batch_size * args.accum_freq * env.world_size,
        )
        logging.info(
            "run directory %s; device %s; precision %s; terms %s",
            run_dir,
            env.device,
            precision,
            ", ".join(("global",) + terms),
        )
        for level, message in inputs.report:
            logging.log(level, message)
        torch.manual_seed(args.seed)
        model = build_model(args, env.device, precision)
        dataset = inputs.dataset(model.visual.input_resolution, args.seed)
        val = (
            load_val(paths.val_data, paths.val_images, args.caption_key) if paths.val_data else None
        )
        loader, sampler = make_train_loader(
            dataset,
            args.batch_size,
            args.workers,
            env.world_size,
            env.rank,
            args.seed,
            pin_memory=env.device.type == "cuda",
        )
        per_step = args.batch_size * args.accum_freq  # examples per rank and optimiser step
        steps_per_epoch = len(sampler) // per_step
        if steps_per_epoch == 0:
            raise InputError(
                f"--train-data: {paths.train_data} has {len(dataset)} examples, fewer than one "
                f"global batch ({args.batch_size} x {args.accum_freq} micro-batches x "
                f"{env.world_size} ranks); lower --batch-size or --accum-freq"
            )
        total_steps = steps_per_epoch * args.epochs
        logging.info(
            "%d training examples, %d steps per epoch, %d steps in all",
            len(dataset),
            steps_per_epoch,
            total_steps,
        )
        ctx = _context(
            args,
            env,
            compile_model(_wrap_distributed(model, args, env), args, env),
            precision,
            terms,
            run_dir,
            steps_per_epoch,
            keep_history,
        )
        start_step = _restore(resume_path, args, ctx) if resume_path is not None else 0

        def on_step_end(epoch: int, step: int) -> None:
            if (
                env.is_master
                and args.save_every_n_steps
                and step % args.save_every_n_steps == 0
                and step % steps_per_epoch != 0
            ):
                ckpt_io.save_checkpoint(
                    _checkpoint(args, ctx, epoch, step), ckpt_dir / ckpt_io.LATEST
                )
                logging.info("saved %s (step %d)", ckpt_dir / ckpt_io.LATEST, step)

        ctx.on_step_end = on_step_end
        result = RunResult(
            run_dir=run_dir,
            history=ctx.history if ctx.history is not None else [],
            final_step=start_step,
        )
        step = start_step
        for epoch in range(start_step // steps_per_epoch, args.stop_after_epoch or args.epochs):
            first = max(step, epoch * steps_per_epoch)
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.set_start((first - epoch * steps_per_epoch) * per_step)
            train_one_epoch(ctx, loader, epoch, first)
            step = (epoch + 1) * steps_per_epoch
            if env.is_master:
                _end_of_epoch(args, ctx, val, ckpt_dir, epoch + 1, step, result)
            barrier(env)
        result.final_step = max(step, start_step)
        if start_step >= total_steps:
            logging.info(
                "nothing to do: the checkpoint is already at step %d of %d", start_step, total_steps
            )
        return result
    finally:
        if ctx is not None and ctx.writer is not None:
            ctx.writer.close()
        if ctx is not None and ctx.wandb is not None:
            ctx.wandb.finish()
        close_logging()
