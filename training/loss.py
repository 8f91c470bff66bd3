"""The AGREE loss (spec 3.2): global contrastive term plus five entity-alignment terms.

Every function takes L2-normalised feature tensors and the logit scale `scale` (= tau =
logit_scale.exp()) and returns a scalar. Targets of every cross-entropy are on the diagonal.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTS = {
    "global": 0.90,
    "prompt": 0.03,
    "text_mask": 0.10,
    "da_contrastive": 0.03,
    "da_mask": 0.15,
    "grounding_mask": 0.10,
}
RANK_TERMS = ("text_mask", "da_mask", "grounding_mask")


def contrastive(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """(CE(tau a b^T) + CE(tau b a^T)) / 2 with targets on the diagonal; a, b: [N, d]."""
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def rank(pos: Tensor, neg: Tensor) -> Tensor:
    """rank(a, b) = sum_i max(0, b_i - a_i): the unmasked score `pos` must beat the masked one `neg`."""
    return torch.clamp(neg - pos, min=0).sum()


def global_loss(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """Global image-caption contrastive term."""
    return contrastive(image, text, scale)


def prompt_loss(image: Tensor, prompts: Tensor, scale: Tensor) -> Tensor:
    """Mean over the prompt slots j of contrastive(I, P_j); prompts: [N, S, d] (all slots in one batched op)."""
    n, s, _ = prompts.shape
    logits = scale * torch.einsum("nd,msd->snm", image, prompts)  # [S, N(images), N(prompts)]
    target = torch.arange(n, device=image.device).repeat(s)
    i2p = F.cross_entropy(logits.reshape(s * n, n), target)
    p2i = F.cross_entropy(logits.transpose(1, 2).reshape(s * n, n), target)
    return (i2p + p2i) / 2


def text_mask_loss(image: Tensor, text: Tensor, masked: Tensor, scale: Tensor) -> Tensor:
    """sum_j rank(diag(tau I T^T), diag(tau I M_j^T)) / tau; masked: [N, S, d]."""
    pos = scale * (image * text).sum(-1)                        # [N]
    neg = scale * torch.einsum("nd,nsd->ns", image, masked)     # [N, S]
    return rank(pos.unsqueeze(1), neg) / scale


def da_contrastive_loss(da_image: Tensor, da_text: Tensor, scale: Tensor) -> Tensor:
    """Visual Genome object image vs its prompt, contrastive."""
    return contrastive(da_image, da_text, scale)


def da_mask_loss(da_image: Tensor, da_image_masked: Tensor, da_text: Tensor, scale: Tensor) -> Tensor:
    """rank(diag(tau D Dt^T), diag(tau Dm Dt^T)) / tau."""
    pos = scale * (da_image * da_text).sum(-1)
    neg = scale * (da_image_masked * da_text).sum(-1)
    return rank(pos, neg) / scale


def grounding_mask_loss(image: Tensor, vg_masked: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """rank(diag(tau I T^T), diag(tau V T^T)) / tau."""
    pos = scale * (image * text).sum(-1)
    neg = scale * (vg_masked * text).sum(-1)
    return rank(pos, neg) / scale


def loss_terms(feats: Mapping[str, Tensor], scale: Tensor, terms: Iterable[str],
               legacy_detached_rank: bool = False) -> dict[str, Tensor]:
    """Unweighted value of the global term and of each enabled term.

    `feats` holds image, text and, as the terms need them, prompts, masked [N, S, d], da_image,
    da_image_masked, da_text, vg_masked [N, d]. With `legacy_detached_rank` the ranking terms are
    detached, as in the released code (they change the reported loss, not the gradient).
    """
    out = {"global": global_loss(feats["image"], feats["text"], scale)}
    for term in terms:
        if term == "prompt":
            v = prompt_loss(feats["image"], feats["prompts"], scale)
        elif term == "text_mask":
            v = text_mask_loss(feats["image"], feats["text"], feats["masked"], scale)
        elif term == "da_contrastive":
            v = da_contrastive_loss(feats["da_image"], feats["da_text"], scale)
        elif term == "da_mask":
            v = da_mask_loss(feats["da_image"], feats["da_image_masked"], feats["da_text"], scale)
        elif term == "grounding_mask":
            v = grounding_mask_loss(feats["image"], feats["vg_masked"], feats["text"], scale)
        else:
            raise ValueError(f"unknown loss term {term!r}")
        if legacy_detached_rank and term in RANK_TERMS:
            v = v.detach()
        out[term] = v
    return out


def total_loss(values: Mapping[str, Tensor], weights: Optional[Mapping[str, float]] = None) -> Tensor:
    """Weighted sum of the computed terms (spec 3.2 weights by default)."""
    weights = WEIGHTS if weights is None else weights
    return sum(weights[k] * v for k, v in values.items())
