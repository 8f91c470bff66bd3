"""--legacy-detached-rank gives the released code's gradients (docs/method.md §2.1), the logit scale included.

The released arithmetic is rebuilt here from docs/method.md, the way the release writes it: every slot
encoded by its own model call, the diagonal scores of the ranking terms copied as Python scalars into
new tensors (so they carry no gradient), MarginRankingLoss(reduction="sum") with target 1, and the
sum divided in place by the logit scale tau, which does carry gradient.
"""

import math

import pytest
import torch
from _train_data import one_torch_thread  # noqa: F401 (autouse fixture)
from torch import nn

from clip import model as clip_model
from clip.clip import create_model, tokenize
from training import terms as T

N, SLOTS = 4, 5
# docs/method.md §2 table: global, prompt, text mask, VG contrastive, VG mask, grounding mask
WEIGHTS = {
    "global": 0.90,
    "prompt": 0.03,
    "text_mask": 0.10,
    "vg_contrastive": 0.03,
    "vg_mask": 0.15,
    "grounding_mask": 0.10,
}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    images = {
        k: torch.randn(N, 3, 64, 64, generator=g, dtype=torch.float64)
        for k in ("image", "vg_image", "vg_image_masked", "grounding_masked")
    }
    words = ["dog", "cat", "red ball", "tree", "hat"]
    caps = [f"a {w} next to a {words[(i + 1) % 5]}" for i, w in enumerate(words[:N])]
    texts = {
        "text": tokenize(caps),
        "vg_text": tokenize([f"a photo containing {w}" for w in words[:N]]),
        "prompts": tokenize(
            [
                f"a photo containing {words[(i + j) % 5]}" if j < 3 else ""
                for i in range(N)
                for j in range(SLOTS)
            ]
        ).view(N, SLOTS, -1),
        "masked": tokenize(
            [
                c.replace(words[(i + j) % 5], "[MASK]") if j < 3 else ""
                for i, c in enumerate(caps)
                for j in range(SLOTS)
            ]
        ).view(N, SLOTS, -1),
    }
    return {**images, **texts}


@pytest.fixture(autouse=True)
def fp64_layer_norm(monkeypatch):
    """CLIP's LayerNorm computes in fp32 (for fp16 weights); here the whole model runs in fp64."""
    monkeypatch.setattr(clip_model.LayerNorm, "forward", nn.LayerNorm.forward)


def _model():
    torch.manual_seed(0)
    model = create_model("tiny").double()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # tau = e^2: the hinges are active on random features
    return model


def _norm(x):
    return x / x.norm(dim=-1, keepdim=True)


def _release_loss(model, b):
    """The released loss, slot by slot (docs/method.md §2 with the ranking scores detached, §2.1)."""
    img, txt = _norm(model.encode_image(b["image"])), _norm(model.encode_text(b["text"]))
    da_img, da_txt = (
        _norm(model.encode_image(b["vg_image"])),
        _norm(model.encode_text(b["vg_text"])),
    )
    da_mask = _norm(model.encode_image(b["vg_image_masked"]))
    vg_mask = _norm(model.encode_image(b["grounding_masked"]))
    prompts = [_norm(model.encode_text(b["prompts"][:, j])) for j in range(SLOTS)]
    masks = [_norm(model.encode_text(b["masked"][:, j])) for j in range(SLOTS)]
    tau = model.logit_scale.exp()
    ce, margin = nn.CrossEntropyLoss(), nn.MarginRankingLoss(reduction="sum")
    gt, target = torch.arange(N), torch.ones(N, dtype=torch.float64)

    def diag(logits):  # Python scalars copied into a new tensor: no gradient
        return torch.tensor([logits[i][i].item() for i in range(N)], dtype=torch.float64)

    l_img = tau * img @ txt.t()
    l_da = tau * da_img @ da_txt.t()
    total = (ce(l_img, gt) + ce(l_img.t(), gt)) / 2
    da_total = (ce(l_da, gt) + ce(l_da.t(), gt)) / 2
    prompt = 0
    for p in prompts:
        prompt = prompt + (ce(tau * img @ p.t(), gt) + ce(tau * p @ img.t(), gt)) / 2
    prompt = prompt / SLOTS
    img_gt, da_gt = diag(l_img), diag(l_da)
    mask = 0
    for m in masks:
        mask = mask + margin(img_gt, diag(tau * img @ m.t()), target)
    mask /= tau
    da_mask_loss = margin(da_gt, diag(tau * da_mask @ da_txt.t()), target)
    da_mask_loss /= tau
    vg_mask_loss = margin(img_gt, diag(tau * vg_mask @ txt.t()), target)
    vg_mask_loss /= tau
    parts = {
        "global": total,
        "prompt": prompt,
        "text_mask": mask,
        "vg_contrastive": da_total,
        "vg_mask": da_mask_loss,
        "grounding_mask": vg_mask_loss,
    }
    return sum(WEIGHTS[k] * v for k, v in parts.items()), parts


def _project_loss(model, b, legacy):
    """The project's loss terms (training.terms) on the same model's features."""
    feats = {
        k: _norm(model.encode_image(b[k]))
        for k in ("image", "vg_image", "vg_image_masked", "grounding_masked")
    }
    feats.update({k: _norm(model.encode_text(b[k])) for k in ("text", "vg_text")})
    for k in ("prompts", "masked"):
        feats[k] = _norm(model.encode_text(b[k].flatten(0, 1))).view(N, SLOTS, -1)
    values = T.loss_terms(
        feats, model.logit_scale.exp(), T.AGREE_TERMS, legacy_detached_rank=legacy
    )
    return T.total_loss(values), values


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }


def test_legacy_flag_gives_the_released_gradient_of_every_parameter(batch):
    model = _model()
    release_total, release_parts = _release_loss(model, batch)
    for k in ("text_mask", "vg_mask", "grounding_mask"):
        assert release_parts[k].item() > 0, k  # every ranking term is active
    want = _grads(model, release_total)
    legacy_total, legacy_parts = _project_loss(model, batch, legacy=True)
    assert legacy_total.item() == pytest.approx(release_total.item(), rel=1e-9)
    for k, v in release_parts.items():
        assert legacy_parts[k].item() == pytest.approx(v.item(), rel=1e-9), k
    got = _grads(model, legacy_total)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-9, msg=name)

    # tau does get gradient from the three ranking terms: d(S/tau)/dlogit_scale = -S/tau
    tau = model.logit_scale.exp().item()
    ranking = sum(
        WEIGHTS[k] * release_parts[k].item() * tau
        for k in ("text_mask", "vg_mask", "grounding_mask")
    )
    _, parts = _release_loss(model, batch)
    model.zero_grad(set_to_none=True)
    sum(
        WEIGHTS[k] * v
        for k, v in parts.items()
        if k not in ("text_mask", "vg_mask", "grounding_mask")
    ).backward(inputs=[model.logit_scale])
    without_ranking = model.logit_scale.grad.item()
    assert abs(ranking / tau) > 1e-3
    assert want["logit_scale"].item() == pytest.approx(without_ranking - ranking / tau, rel=1e-6)


def test_default_sends_the_ranking_terms_gradient_to_the_towers(batch):
    model = _model()
    release = _grads(model, _release_loss(model, batch)[0])
    default = _grads(model, _project_loss(model, batch, legacy=False)[0])
    differs = [
        n for n in release if not torch.allclose(release[n], default[n], rtol=1e-4, atol=1e-8)
    ]
    assert "visual.conv1.weight" in differs and "token_embedding.weight" in differs


def test_legacy_flag_clamps_the_logit_scale_at_the_releases_literal():
    """The release clamps to 4.6052, a little above ln 100 = 4.6051702 (tau 100.003 instead of 100)."""
    from training.distributed import DistEnv
    from training.synthetic_batch import make_batch
    from training.train import StepConfig, train_step

    model = create_model("tiny")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batch(2, 64)
    got = {}
    for legacy in (False, True):
        with torch.no_grad():
            model.logit_scale.fill_(7.0)
        cfg = StepConfig(terms=("text_mask",), env=DistEnv(), legacy_detached_rank=legacy)
        train_step(model, batch, opt, None, cfg)
        got[legacy] = model.logit_scale.item()
    assert got[True] == torch.tensor(4.6052).item()
    assert got[False] == torch.tensor(math.log(100)).item()
    assert got[True] > got[False]
