"""Each AGREE loss term against a value computed independently with plain Python loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from training import loss as L
from training import terms as T

D = 6


def _feats(n, *extra, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(
        torch.randn(*((n,) + extra + (D,)), generator=g, dtype=torch.float64), dim=-1
    )


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _ce_rows(rows):
    """Mean cross-entropy of a list of logit rows with target = row index."""
    total = 0.0
    for i, row in enumerate(rows):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[i]
    return total / len(rows)


def _hand_contrastive(a, b, tau):
    a, b = a.tolist(), b.tolist()
    n = len(a)
    ab = [[tau * _dot(a[i], b[j]) for j in range(n)] for i in range(n)]
    ba = [[tau * _dot(b[i], a[j]) for j in range(n)] for i in range(n)]
    return (_ce_rows(ab) + _ce_rows(ba)) / 2


def _hand_rank(pos, neg):
    return sum(max(0.0, b - a) for a, b in zip(pos, neg))


TAU = torch.tensor(14.285714, dtype=torch.float64)
tau = float(TAU)


def test_global_contrastive_matches_hand_value():
    i, t = _feats(5, seed=1), _feats(5, seed=2)
    got = L.global_loss({"image": i, "text": t}, TAU).item()
    assert got == pytest.approx(_hand_contrastive(i, t, tau), rel=1e-9)
    # a perfectly aligned batch with a large scale has ~0 loss; a shuffled one does not
    assert (
        L.global_loss({"image": i, "text": i}, torch.tensor(100.0, dtype=torch.float64)).item()
        < 1e-3
    )
    assert L.global_loss({"image": i, "text": i.flip(0)}, TAU).item() > 1.0


def test_prompt_term_is_mean_over_slots_of_contrastive():
    i, p = _feats(4, seed=3), _feats(4, 5, seed=4)
    expected = sum(_hand_contrastive(i, p[:, j], tau) for j in range(5)) / 5
    assert L.prompt_loss({"image": i, "prompts": p}, TAU).item() == pytest.approx(
        expected, rel=1e-9
    )


def test_text_mask_term_sums_hinges_over_slots_and_batch():
    i, t, m = _feats(4, seed=5), _feats(4, seed=6), _feats(4, 5, seed=7)
    il, tl, ml = i.tolist(), t.tolist(), m.tolist()
    expected = 0.0
    for j in range(5):
        pos = [tau * _dot(il[k], tl[k]) for k in range(4)]
        neg = [tau * _dot(il[k], ml[k][j]) for k in range(4)]
        expected += _hand_rank(pos, neg)
    expected /= tau
    got = L.text_mask_loss({"image": i, "text": t, "masked": m}, TAU).item()
    assert expected > 0  # random features: some masked captions beat the caption
    assert got == pytest.approx(expected, rel=1e-9)


def test_text_mask_term_is_zero_when_every_caption_beats_its_masks():
    i = _feats(3, seed=8)
    m = -i[:, None, :].expand(3, 5, D)  # masked captions point away from the image
    assert L.text_mask_loss({"image": i, "text": i, "masked": m}, TAU).item() == 0.0


def test_vg_contrastive_term():
    d, dt = _feats(6, seed=9), _feats(6, seed=10)
    assert L.vg_contrastive_loss({"vg_image": d, "vg_text": dt}, TAU).item() == pytest.approx(
        _hand_contrastive(d, dt, tau), rel=1e-9
    )


def test_vg_mask_term():
    d, dm, dt = _feats(6, seed=11), _feats(6, seed=12), _feats(6, seed=13)
    dl, dml, dtl = d.tolist(), dm.tolist(), dt.tolist()
    pos = [tau * _dot(dl[k], dtl[k]) for k in range(6)]
    neg = [tau * _dot(dml[k], dtl[k]) for k in range(6)]
    expected = _hand_rank(pos, neg) / tau
    assert expected > 0
    assert L.vg_mask_loss(
        {"vg_image": d, "vg_image_masked": dm, "vg_text": dt}, TAU
    ).item() == pytest.approx(expected, rel=1e-9)


def test_grounding_mask_term():
    i, v, t = _feats(6, seed=14), _feats(6, seed=15), _feats(6, seed=16)
    il, vl, tl = i.tolist(), v.tolist(), t.tolist()
    pos = [tau * _dot(il[k], tl[k]) for k in range(6)]
    neg = [tau * _dot(vl[k], tl[k]) for k in range(6)]
    expected = _hand_rank(pos, neg) / tau
    assert expected > 0
    assert L.grounding_mask_loss(
        {"image": i, "grounding_masked": v, "text": t}, TAU
    ).item() == pytest.approx(expected, rel=1e-9)


def _all_feats(requires_grad=False):
    f = {
        "image": _feats(4, seed=20),
        "text": _feats(4, seed=21),
        "prompts": _feats(4, 5, seed=22),
        "masked": _feats(4, 5, seed=23),
        "vg_image": _feats(4, seed=24),
        "vg_image_masked": _feats(4, seed=25),
        "vg_text": _feats(4, seed=26),
        "grounding_masked": _feats(4, seed=27),
    }
    if requires_grad:
        for v in f.values():
            v.requires_grad_(True)
    return f


ALL = T.AGREE_TERMS


def test_weighted_total_uses_spec_weights_and_only_enabled_terms():
    f = _all_feats()
    values = T.loss_terms(f, TAU, ALL)
    hand = {
        "global": _hand_contrastive(f["image"], f["text"], tau),
        "prompt": sum(_hand_contrastive(f["image"], f["prompts"][:, j], tau) for j in range(5)) / 5,
        "vg_contrastive": _hand_contrastive(f["vg_image"], f["vg_text"], tau),
    }
    for k, v in hand.items():
        assert values[k].item() == pytest.approx(v, rel=1e-9)
    expected = (
        0.90 * hand["global"]
        + 0.03 * hand["prompt"]
        + 0.10 * values["text_mask"].item()
        + 0.03 * hand["vg_contrastive"]
        + 0.15 * values["vg_mask"].item()
        + 0.10 * values["grounding_mask"].item()
    )
    assert T.total_loss(values).item() == pytest.approx(expected, rel=1e-9)
    # one flag: only global + that term, and the total is their weighted sum
    only = T.loss_terms(f, TAU, ("vg_mask",))
    assert set(only) == {"global", "vg_mask"}
    assert T.total_loss(only).item() == pytest.approx(
        0.9 * hand["global"] + 0.15 * only["vg_mask"].item(), rel=1e-9
    )
    # the needed features only: a term's inputs may be absent when it is off
    minimal = {k: f[k] for k in ("image", "text", "grounding_masked")}
    assert set(T.loss_terms(minimal, TAU, ("grounding_mask",))) == {"global", "grounding_mask"}


@pytest.mark.parametrize(
    "term,inputs",
    [
        ("text_mask", ("masked",)),
        ("vg_mask", ("vg_image_masked",)),
        ("grounding_mask", ("grounding_masked",)),
    ],
)
def test_ranking_terms_have_gradient_by_default_and_only_to_tau_with_legacy_flag(term, inputs):
    f = _all_feats(requires_grad=True)
    scale = TAU.clone().requires_grad_(True)
    values = T.loss_terms(f, scale, (term,))
    assert values[term].item() > 0
    values[term].backward()
    for k in inputs:  # only the ranking term reads these features
        assert f[k].grad is not None and f[k].grad.abs().sum() > 0
    # S/tau with S computed from tau-scaled scores does not depend on tau
    assert scale.grad.item() == pytest.approx(0.0, abs=1e-12)

    f = _all_feats(requires_grad=True)
    scale = TAU.clone().requires_grad_(True)
    legacy = T.loss_terms(f, scale, (term,), legacy_detached_rank=True)
    assert legacy[term].item() == pytest.approx(values[term].item())  # same value, reported
    legacy[term].backward()
    for k in inputs:  # the towers get nothing from the term ...
        assert f[k].grad is None or f[k].grad.abs().sum() == 0
    # ... but tau does, as in the release: d(S/tau)/dtau = -S/tau^2 = -value/tau
    assert scale.grad.item() == pytest.approx(-values[term].item() / tau, rel=1e-9)


def test_registry_matches_the_spec_table():
    assert [(t.name, t.flag, t.weight) for t in T.TERMS] == [
        ("global", None, 0.90),
        ("prompt", "--is-prompt", 0.03),
        ("text_mask", "--is-mask", 0.10),
        ("vg_contrastive", "--is-da-loss", 0.03),
        ("vg_mask", "--is-da-mask", 0.15),
        ("grounding_mask", "--is-vg", 0.10),
    ]
    assert {t.name for t in T.TERMS if t.ranking} == {"text_mask", "vg_mask", "grounding_mask"}


def test_rank_hinge_has_margin_zero():
    pos = torch.tensor([1.0, 2.0, 3.0])
    neg = torch.tensor([1.5, 2.0, 2.0])
    assert L.rank(pos, neg).item() == pytest.approx(0.5)
