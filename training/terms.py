"""The registry of AGREE's loss terms: name, flag, table label, weight, the batch slots it reads, its loss.

Flags, loss, data loading, the table runner and the benchmarks all read this one table. The slots
themselves (kind, input files, how each is built, fallback) are declared in training.slots.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from torch import Tensor

from training import loss as L
from training.slots import IMAGE_SLOTS, SLOTS, TEXT_SLOTS  # noqa: F401 (the batch slots, declared there)


@dataclass(frozen=True)
class Term:
    """One loss term (docs/method.md §2)."""

    name: str  # key of the term's value in logs and loss dicts
    label: str  # row label in the tables ("AGREE w/o <label>")
    flag: Optional[str]  # the release's flag that enables it; None = always on
    weight: float  # weight in the total loss
    slots: tuple[str, ...]  # batch slots its loss reads
    loss: Callable[[Mapping[str, Tensor], Tensor], Tensor]
    # ranking (mask) terms only: the hinge sum S of the loss S / tau (what --legacy-detached-rank detaches)
    hinge: Optional[Callable[[Mapping[str, Tensor], Tensor], Tensor]] = None
    help: str = ""

    @property
    def ranking(self) -> bool:
        """True for the three ranking (mask) terms."""
        return self.hinge is not None

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag (--is-da-loss -> is_da_loss)."""
        return self.flag[2:].replace("-", "_") if self.flag else ""


TERMS: tuple[Term, ...] = (
    Term(
        "global",
        "global",
        None,
        0.90,
        ("image", "text"),
        L.global_loss,
        help="Image vs caption contrastive term (always on).",
    ),
    Term(
        "prompt",
        "prompt",
        "--is-prompt",
        0.03,
        ("image", "prompts"),
        L.prompt_loss,
        help="Image vs entity prompt 'a photo containing {entity}' contrastive term",
    ),
    Term(
        "text_mask",
        "text mask",
        "--is-mask",
        0.10,
        ("image", "text", "masked"),
        L.text_mask_loss,
        L.text_mask_hinge,
        help="Caption vs entity-masked caption ranking term",
    ),
    Term(
        "vg_contrastive",
        "VG contrastive",
        "--is-da-loss",
        0.03,
        ("vg_image", "vg_text"),
        L.vg_contrastive_loss,
        help="Visual Genome object image vs its prompt contrastive term",
    ),
    Term(
        "vg_mask",
        "VG mask",
        "--is-da-mask",
        0.15,
        ("vg_image", "vg_image_masked", "vg_text"),
        L.vg_mask_loss,
        L.vg_mask_hinge,
        help="Visual Genome image vs object-masked VG image ranking term",
    ),
    Term(
        "grounding_mask",
        "grounding mask",
        "--is-vg",
        0.10,
        ("image", "text", "grounding_masked"),
        L.grounding_mask_loss,
        L.grounding_mask_hinge,
        help="Image vs grounding-masked image ranking term",
    ),
)
BY_NAME: dict[str, Term] = {t.name: t for t in TERMS}
GLOBAL = BY_NAME["global"]
OPTIONAL: tuple[Term, ...] = tuple(t for t in TERMS if t.flag is not None)  # the five AGREE terms
AGREE_TERMS: tuple[str, ...] = tuple(t.name for t in OPTIONAL)


def add_term_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One store_true flag per optional term (the release's names)."""
    for t in OPTIONAL:
        parser.add_argument(t.flag, action="store_true", help=f"{t.help} (weight {t.weight}).")


def enabled_terms(args: argparse.Namespace) -> tuple[str, ...]:
    """Names of the optional terms whose flag is set, in registry order."""
    return tuple(t.name for t in OPTIONAL if getattr(args, t.dest))


def flags_of(names: Iterable[str]) -> list[str]:
    """The command-line flags that enable these terms."""
    return [BY_NAME[n].flag for n in names if BY_NAME[n].flag]


def slots_of(names: Iterable[str]) -> set[str]:
    """Every batch slot read by the global term and the named terms."""
    return {s for n in ("global", *names) for s in BY_NAME[n].slots}


def loss_terms(
    feats: Mapping[str, Tensor],
    scale: Tensor,
    names: Iterable[str],
    legacy_detached_rank: bool = False,
) -> dict[str, Tensor]:
    """Unweighted value of the global term and of each named term.

    With `legacy_detached_rank` a ranking term is computed as the released code computes it (docs/method.md §2.1):
    its hinge sum S is detached (no gradient to the towers), then divided by tau, which keeps its
    gradient, so the logit scale still receives d(S/tau)/dtau = -S/tau^2 from the term.
    """
    out = {}
    for name in ("global", *names):
        term = BY_NAME.get(name)
        if term is None:
            raise ValueError(f"unknown loss term {name!r}")
        if legacy_detached_rank and term.hinge is not None:
            out[name] = term.hinge(feats, scale).detach() / scale
        else:
            out[name] = term.loss(feats, scale)
    return out


def total_loss(
    values: Mapping[str, Tensor], weights: Optional[Mapping[str, float]] = None
) -> Tensor:
    """Weighted sum of the computed terms (the registry's weights by default)."""
    return sum(
        (weights[k] if weights is not None else BY_NAME[k].weight) * v for k, v in values.items()
    )
