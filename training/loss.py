"""The AGREE loss terms (docs/method.md §2): the global contrastive term and the five entity-alignment terms.

Each term reads L2-normalised features from a dict keyed by batch slot (see training.terms) and the
logit scale `scale` (tau = logit_scale.exp()), and returns a scalar. Cross-entropy targets are on
the diagonal; rank(a, b) = sum_i max(0, b_i - a_i): the unmasked score must beat the masked one.
A ranking term is its hinge sum S (over tau-scaled scores) divided by tau; the `*_hinge` functions
return S alone, so that --legacy-detached-rank can detach S and still divide by tau (docs/method.md §2.1).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

Feats = Mapping[str, Tensor]


def contrastive(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """(CE(tau a b^T) + CE(tau b a^T)) / 2 with targets on the diagonal; a, b: [N, d]."""
    logits = scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def rank(pos: Tensor, neg: Tensor) -> Tensor:
    """sum_i max(0, neg_i - pos_i)."""
    return torch.clamp(neg - pos, min=0).sum()


def global_loss(f: Feats, scale: Tensor) -> Tensor:
    """Image vs caption, contrastive."""
    return contrastive(f["image"], f["text"], scale)


def prompt_loss(f: Feats, scale: Tensor) -> Tensor:
    """Mean over the prompt slots j of contrastive(I, P_j); prompts [N, S, d], all slots in one batched op."""
    image, prompts = f["image"], f["prompts"]
    n, s, _ = prompts.shape
    logits = scale * torch.einsum("nd,msd->snm", image, prompts)  # [S, N(images), N(prompts)]
    target = torch.arange(n, device=image.device).repeat(s)
    i2p = F.cross_entropy(logits.reshape(s * n, n), target)
    p2i = F.cross_entropy(logits.transpose(1, 2).reshape(s * n, n), target)
    return (i2p + p2i) / 2


def text_mask_hinge(f: Feats, scale: Tensor) -> Tensor:
    """sum_j rank(diag(tau I T^T), diag(tau I M_j^T)); masked [N, S, d]."""
    image = f["image"]
    pos = scale * (image * f["text"]).sum(-1)  # [N]
    neg = scale * torch.einsum("nd,nsd->ns", image, f["masked"])  # [N, S]
    return rank(pos.unsqueeze(1), neg)


def text_mask_loss(f: Feats, scale: Tensor) -> Tensor:
    """sum_j rank(diag(tau I T^T), diag(tau I M_j^T)) / tau: the caption must beat each entity-masked caption."""
    return text_mask_hinge(f, scale) / scale


def vg_contrastive_loss(f: Feats, scale: Tensor) -> Tensor:
    """Visual Genome object image vs its prompt, contrastive."""
    return contrastive(f["vg_image"], f["vg_text"], scale)


def vg_mask_hinge(f: Feats, scale: Tensor) -> Tensor:
    """rank(diag(tau D Dt^T), diag(tau Dm Dt^T))."""
    pos = scale * (f["vg_image"] * f["vg_text"]).sum(-1)
    neg = scale * (f["vg_image_masked"] * f["vg_text"]).sum(-1)
    return rank(pos, neg)


def vg_mask_loss(f: Feats, scale: Tensor) -> Tensor:
    """rank(diag(tau D Dt^T), diag(tau Dm Dt^T)) / tau: the VG image must beat its object-masked copy."""
    return vg_mask_hinge(f, scale) / scale


def grounding_mask_hinge(f: Feats, scale: Tensor) -> Tensor:
    """rank(diag(tau I T^T), diag(tau V T^T))."""
    pos = scale * (f["image"] * f["text"]).sum(-1)
    neg = scale * (f["grounding_masked"] * f["text"]).sum(-1)
    return rank(pos, neg)


def grounding_mask_loss(f: Feats, scale: Tensor) -> Tensor:
    """rank(diag(tau I T^T), diag(tau V T^T)) / tau: the image must beat its grounding-masked copy."""
    return grounding_mask_hinge(f, scale) / scale
