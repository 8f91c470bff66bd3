"""What the release's ranking terms do to the weights (docs/finetuning.md, "The release's ranking terms").

With --legacy-detached-rank (the release's arithmetic) the three ranking terms send no gradient to the
towers; their only gradient goes to the logit scale tau, -S/tau per term (weighted), which pushes tau up.
OpenAI's checkpoints start with the raw logit scale at (or just above) ln 100, and the release clamps it
to 4.6052 after every step. So the terms can change a weight only through the steps on which tau leaves
that clamp. The runs here start at the clamp. Measured
here, fp64, tiny model, the recipe's AdamW at a constant lr of 1e-5, 4 steps from the same weights on
the same batches (all slots present in both runs, so the forward passes are identical):

* a model that ranks its batches right (the global term's gradient also pushes tau up): tau stays at the
  clamp in both runs and every weight is bit-identical with and without the ranking terms;
* a random model (the global term pulls tau down): tau leaves the clamp in both runs, at different rates
  once Adam's moments differ, and then every weight differs;
* the trained model with the prompt and VG-contrastive terms on as well (AGREE's recipe), which it has
  not learnt: those terms pull tau down, and the ranking terms again change every weight.
"""

import copy

import pytest
import torch
from _train_data import make_dataset, one_torch_thread  # noqa: F401 (autouse fixture)
from torch import nn

from clip import model as clip_model
from clip.clip import create_model
from training.data import resolve_paths
from training.dataset import build_train_dataset
from training.distributed import DistEnv
from training.engine import build_optimizer
from training.params import parse_args
from training.terms import AGREE_TERMS, BY_NAME, enabled_terms
from training.train import LEGACY_LOGIT_SCALE_MAX, StepConfig, compute_loss, train_step

RANKING = tuple(t for t in AGREE_TERMS if BY_NAME[t].ranking)  # text_mask, vg_mask, grounding_mask
CONTRASTIVE = tuple(t for t in AGREE_TERMS if not BY_NAME[t].ranking)  # prompt, vg_contrastive
CLAMP = LEGACY_LOGIT_SCALE_MAX  # the release's clamp, which --legacy-detached-rank applies
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two batches of 4 distinct images (two epochs' augmentation) with every slot, and the recipe's flags."""
    paths = make_dataset(tmp_path_factory.mktemp("rank"), n_images=4, caps_per_image=1, n_val=2)
    flags = ["--is-prompt", "--is-mask", "--is-da-loss", "--is-da-mask", "--is-vg"]
    args = parse_args(
        [
            "--train-data",
            str(paths["train"]),
            "--model",
            "tiny",
            *flags,
            "--lr",
            "1e-5",
            "--wd",
            "0.1",
            *("--augment", "random-resized-crop"),  # two distinct batches of the same images
        ]
    )
    dset = build_train_dataset(args, resolve_paths(args), enabled_terms(args), 64)
    batches = []
    for epoch in range(2):
        dset.set_epoch(epoch)
        batches.append(torch.utils.data.default_collate([dset[i] for i in range(4)]))
    return args, batches


@pytest.fixture(scope="module")
def trained(setup):
    """The tiny model trained (fp32) on the batches' images and captions until it ranks them right."""
    _, batches = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside the autouse one-thread fixture
    try:
        torch.manual_seed(0)
        model = create_model("tiny")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cfg = StepConfig(terms=(), env=DistEnv())
        for i in range(60):
            b = batches[i % len(batches)]
            train_step(model, {"image": b["image"], "text": b["text"]}, opt, None, cfg)
    finally:
        torch.set_num_threads(threads)
    return model


@pytest.fixture(autouse=True)
def fp64_layer_norm(monkeypatch):
    """CLIP's LayerNorm computes in fp32 (for fp16 weights); here the whole model runs in fp64."""
    monkeypatch.setattr(clip_model.LayerNorm, "forward", nn.LayerNorm.forward)


def _at_clamp(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).double()
    with torch.no_grad():
        model.logit_scale.fill_(CLAMP)
    return model


def _tau_gradient(model, batches, terms) -> list[float]:
    """d(weighted loss of `terms` and the global term)/d(raw logit scale) on each batch, ranking terms off."""
    out = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        total, _ = compute_loss(model, b, StepConfig(terms=terms, env=DistEnv()))
        total.backward()
        out.append(model.logit_scale.grad.item())
    model.zero_grad(set_to_none=True)
    return out


def _train(start, args, batches, terms):
    """STEPS optimiser steps with --legacy-detached-rank; (model, raw logit scale after each step, last losses)."""
    model = copy.deepcopy(start)
    opt = build_optimizer(model, args)
    cfg = StepConfig(terms=terms, env=DistEnv(), legacy_detached_rank=True)
    scales, losses = [], {}
    for i in range(STEPS):
        losses = train_step(model, batches[i % len(batches)], opt, None, cfg)
        scales.append(model.logit_scale.item())
    return model, scales, losses


def _differing(a: nn.Module, b: nn.Module) -> list[str]:
    return [n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)]


def _report(case, start, tau_grad, without, s_without, with_rank, s_with, losses):
    """The measured numbers (docs/finetuning.md quotes them; shown with pytest -s)."""
    diff = max(
        (p - q).abs().max().item() for p, q in zip(without.parameters(), with_rank.parameters())
    )
    moved = max(
        (p - q).abs().max().item() for p, q in zip(without.parameters(), start.parameters())
    )
    hinges = ", ".join(f"{t} {losses[t]:.3g}" for t in RANKING if t in losses)
    print(
        f"\n{case}: other terms' d/d(raw scale) {[f'{g:+.2g}' for g in tau_grad]}; raw scale after "
        f"{STEPS} steps {s_without[-1]:.7f} without, {s_with[-1]:.7f} with the ranking terms (clamp "
        f"{CLAMP:.7f}); hinges {hinges}; {len(_differing(without, with_rank))}/"
        f"{len(list(start.parameters()))} tensors differ, by up to {diff:.2g}; steps moved weights by up "
        f"to {moved:.2g}"
    )


def test_at_the_clamp_the_ranking_terms_change_no_weight_when_the_other_terms_push_tau_up(
    setup, trained
):
    args, batches = setup
    start = _at_clamp(trained)
    tau_grad = _tau_gradient(start, batches, ())
    assert all(g < 0 for g in tau_grad), "the global term pushes tau up"
    without, s_without, _ = _train(start, args, batches, ())
    with_rank, s_with, losses = _train(start, args, batches, RANKING)
    _report("trained", start, tau_grad, without, s_without, with_rank, s_with, losses)
    assert losses["text_mask"] > 0 and losses["vg_mask"] > 0  # the ranking terms are active
    assert s_without == s_with == [CLAMP] * STEPS  # tau never leaves the clamp
    assert _differing(without, with_rank) == []  # every weight bit-identical
    assert _differing(without, start)  # ... and the weights did train


def test_the_ranking_terms_change_every_weight_once_tau_leaves_the_clamp(setup):
    args, batches = setup
    torch.manual_seed(0)
    start = _at_clamp(create_model("tiny"))
    tau_grad = _tau_gradient(start, batches, ())
    assert all(g > 0 for g in tau_grad), "the global term pulls tau down"
    without, s_without, _ = _train(start, args, batches, ())
    with_rank, s_with, losses = _train(start, args, batches, RANKING)
    _report("random", start, tau_grad, without, s_without, with_rank, s_with, losses)
    assert max(s_without) < CLAMP and max(s_with) < CLAMP  # tau left the clamp in both runs
    assert s_with[-1] > s_without[-1]  # the ranking terms' gradient holds tau up
    names = [n for n, _ in start.named_parameters()]
    assert _differing(without, with_rank) == names  # every weight differs after 4 steps


def test_with_agrees_contrastive_terms_on_the_ranking_terms_change_the_trained_model(
    setup, trained
):
    args, batches = setup
    start = _at_clamp(trained)
    tau_grad = _tau_gradient(start, batches, CONTRASTIVE)
    assert all(g > 0 for g in tau_grad)  # the new terms pull tau down
    without, s_without, _ = _train(start, args, batches, CONTRASTIVE)
    with_rank, s_with, losses = _train(start, args, batches, CONTRASTIVE + RANKING)
    _report("trained + contrastive", start, tau_grad, without, s_without, with_rank, s_with, losses)
    assert max(s_without) < CLAMP and max(s_with) < CLAMP
    assert len(_differing(without, with_rank)) > 0.8 * len(list(start.parameters()))
