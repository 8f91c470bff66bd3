"""Putting a run together: run directory, model, optimiser, data, resume, the epoch loop, checkpoints."""
from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from agree.io import InputError, atomic_write
from agree.pretrained import clip_errors_as_input_errors, default_checkpoint, load_pretrained
from clip.clip import create_model
from training import checkpoint as ckpt_io
from training.data import build_train_dataset, check_files, load_val, make_train_loader, resolve_paths
from training.distributed import DistEnv, barrier
from training.logger import close_logging, setup_logging
from training.params import active_terms
from training.scheduler import constant_lr, cosine_lr
from training.train import StepConfig, TrainContext, evaluate, train_one_epoch, unwrap

NO_DECAY_KEYS = ("bn", "ln", "bias", "logit_scale")


@dataclass
class RunResult:
    """What a finished run leaves behind (for callers and tests)."""
    run_dir: Path
    history: list = field(default_factory=list)      # (global step, {term: value}) of every step run here
    val: list = field(default_factory=list)          # (epoch, metrics) after every epoch
    final_step: int = 0


def resolve_precision(requested: Optional[str], device: torch.device) -> str:
    """amp on CUDA and fp32 on CPU by default; amp on CPU falls back to fp32; fp16 needs CUDA."""
    if requested is None:
        return "amp" if device.type == "cuda" else "fp32"
    if device.type != "cuda":
        if requested == "fp16":
            raise InputError("--precision fp16 needs a CUDA device (use fp32 on the CPU)")
        if requested == "amp":
            logging.warning("--precision amp has no effect on the CPU; training in fp32")
            return "fp32"
    return requested


def build_model(args: argparse.Namespace, device: torch.device, precision: str) -> nn.Module:
    """Random init of --model, or the OpenAI checkpoint at --pretrained-path with --openai-pretrained."""
    weights = "fp16" if precision == "fp16" else "fp32"
    if args.openai_pretrained:
        path = Path(args.pretrained_path or default_checkpoint(args.model))
        if not path.is_file():
            raise InputError(f"--openai-pretrained: checkpoint not found: {path} (set --pretrained-path)")
        model, _, _ = load_pretrained(path, device=device, is_train=True, precision=weights)
    else:
        with clip_errors_as_input_errors():
            model = create_model(args.model, device=device, precision=weights)
    return model


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW: no weight decay for bn/ln/bias/logit_scale parameters, --wd for the rest."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": args.wd}]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    fast = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, **fast)


def write_params(args: argparse.Namespace, path: Path) -> None:
    """params.txt: one 'name: value' line per flag, sorted."""
    lines = [f"{k}: {v}\n" for k, v in sorted(vars(args).items())]
    with atomic_write(path, "w") as f:
        f.writelines(lines)


def _resume_path(args: argparse.Namespace, ckpt_dir: Path) -> Optional[Path]:
    if args.resume is None:
        return None
    if args.resume == "latest":
        found = ckpt_io.find_latest(ckpt_dir)
        if found is None:
            raise InputError(f"--resume latest: no checkpoint in {ckpt_dir}")
        return found
    return Path(args.resume)


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
        wandb.init(project="agree", name=args.name, notes=args.wandb_notes, config=vars(args), dir=str(run_dir))
    return writer, wandb


def run(args: argparse.Namespace, env: DistEnv, keep_history: bool = False) -> RunResult:
    """Train as the flags say; rank 0 writes the run directory. `keep_history`: record every step's losses."""
    if "wandb" in args.report and importlib.util.find_spec("wandb") is None:
        raise InputError("--report-to wandb needs the wandb package (pip install wandb)")
    paths = resolve_paths(args)
    check_files(args, paths)
    precision = resolve_precision(args.precision, env.device)
    terms = active_terms(args)
    run_dir = Path(args.logs) / args.name
    ckpt_dir = run_dir / "checkpoints"
    if args.resume is None and (ckpt_dir.exists() or (run_dir / "out.log").exists()):
        raise InputError(f"--name: run directory {run_dir} already exists; choose another --name "
                         "or continue it with --resume latest")
    resume_path = _resume_path(args, ckpt_dir)
    barrier(env)
    setup_logging(run_dir / "out.log", args.debug, env.is_master, env.rank)
    writer = wandb = None
    try:
        if env.is_master:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_params(args, run_dir / "params.txt")
        logging.info("run directory %s; device %s; world size %d; precision %s; terms %s",
                     run_dir, env.device, env.world_size, precision, ", ".join(("global",) + terms))

        torch.manual_seed(args.seed)
        model = build_model(args, env.device, precision)
        resolution = model.visual.input_resolution
        dataset = build_train_dataset(args, paths, terms, resolution)
        val = load_val(paths.val_data, paths.val_images, args.caption_key) if paths.val_data else None
        loader, sampler = make_train_loader(dataset, args.batch_size, args.workers, env.world_size, env.rank,
                                            args.seed, pin_memory=env.device.type == "cuda")
        steps_per_epoch = len(sampler) // args.batch_size
        if steps_per_epoch == 0:
            raise InputError(f"--train-data: {paths.train_data} has {len(dataset)} examples, fewer than one "
                             f"global batch ({args.batch_size} x {env.world_size} ranks); lower --batch-size")
        total_steps = steps_per_epoch * args.epochs
        logging.info("%d training examples, %d steps per epoch, %d steps in all", len(dataset),
                     steps_per_epoch, total_steps)

        if env.distributed:
            if args.use_bn_sync:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ddp_kwargs = {"device_ids": [env.device]} if env.device.type == "cuda" else {}
            model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        optimizer = build_optimizer(model, args)
        scaler = torch.amp.GradScaler("cuda") if precision == "amp" else None
        set_lr = constant_lr(optimizer, args.lr) if args.skip_scheduler else \
            cosine_lr(optimizer, args.lr, args.warmup, total_steps)

        start_step = 0
        if resume_path is not None:
            ckpt = ckpt_io.load_checkpoint(resume_path)
            try:
                unwrap(model).load_state_dict(ckpt_io.strip_module_prefix(ckpt["state_dict"]))
                if "optimizer" in ckpt:
                    optimizer.load_state_dict(ckpt["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise InputError(f"--resume: {resume_path} does not fit --model {args.model} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_step = int(ckpt.get("step", ckpt.get("epoch", 0) * steps_per_epoch))
            if ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
                logging.warning("checkpoint was written with %s steps per epoch, this run has %d",
                                ckpt.get("steps_per_epoch"), steps_per_epoch)
            ckpt_io.set_rng_state(ckpt.get("rng"))
            logging.info("resumed from %s at step %d (epoch %d)", resume_path, start_step,
                         start_step // steps_per_epoch)
            del ckpt

        writer, wandb = _reporters(args, run_dir, env)
        cfg = StepConfig(terms=terms, env=env, precision=precision, aggregate=args.aggregate,
                         gather_with_grad=args.gather_with_grad, legacy_detached_rank=args.legacy_detached_rank)

        def state(epochs_done: int, step: int) -> dict:
            return {"epoch": epochs_done, "step": step, "steps_per_epoch": steps_per_epoch, "name": args.name,
                    "model": args.model, "state_dict": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": ckpt_io.rng_state(), "args": {k: v for k, v in vars(args).items() if k != "report"}}

        def on_step_end(epoch: int, step: int) -> None:
            if (env.is_master and args.save_every_n_steps and step % args.save_every_n_steps == 0
                    and step % steps_per_epoch != 0):
                ckpt_io.save_checkpoint(state(epoch, step), ckpt_dir / ckpt_io.LATEST)
                logging.info("saved %s (step %d)", ckpt_dir / ckpt_io.LATEST, step)

        ctx = TrainContext(model=model, optimizer=optimizer, scaler=scaler, set_lr=set_lr, cfg=cfg,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                           global_batch=args.batch_size * env.world_size, log_every=args.log_every_n_steps,
                           writer=writer, wandb=wandb, on_step_end=on_step_end,
                           history=[] if keep_history else None)
        result = RunResult(run_dir=run_dir, history=ctx.history if ctx.history is not None else [], final_step=start_step)
        step = start_step
        for epoch in range(start_step // steps_per_epoch, args.epochs):
            first = max(step, epoch * steps_per_epoch)
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.set_start((first - epoch * steps_per_epoch) * args.batch_size)
            train_one_epoch(ctx, loader, epoch, first)
            step = (epoch + 1) * steps_per_epoch
            epochs_done = epoch + 1
            if env.is_master:
                if val is not None:
                    metrics = evaluate(model, val, resolution, args.batch_size_eval, args.workers, env.device,
                                       precision)
                    result.val.append((epochs_done, metrics))
                    logging.info("Eval Epoch: %d %s", epochs_done,
                                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    for k, v in metrics.items():
                        if writer is not None:
                            writer.add_scalar(f"val/{k}", v, step)
                    if wandb is not None:
                        wandb.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
                saved = None
                if args.save_frequency > 0 and (epochs_done % args.save_frequency == 0 or epochs_done == args.epochs):
                    saved = ckpt_io.save_checkpoint(state(epochs_done, step), ckpt_dir / f"epoch_{epochs_done}.pt")
                    logging.info("saved %s", saved)
                if args.save_most_recent or args.save_every_n_steps:
                    if saved is not None:
                        ckpt_io.link_or_copy(saved, ckpt_dir / ckpt_io.LATEST)
                    else:
                        ckpt_io.save_checkpoint(state(epochs_done, step), ckpt_dir / ckpt_io.LATEST)
            barrier(env)
        result.final_step = max(step, start_step)
        if start_step >= total_steps:
            logging.info("nothing to do: the checkpoint is already at step %d of %d", start_step, total_steps)
        return result
    finally:
        if writer is not None:
            writer.close()
        if wandb is not None:
            wandb.finish()
        close_logging()
