"""A caption's entity texts: the prompt and the masked caption made from each textual entity (segs).

Training and extraction build them the same way and differ only in which entities qualify and in
how many slots a caption gets (both as in the release): training keeps the segs of at most
MAX_SEG_WORDS words and fills TRAIN_SLOTS slots; extraction takes the entities as given and fills
EVAL_SLOTS slots. Unused slots hold the empty string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

PROMPT_TEMPLATE = "a photo containing {}"
MASK_TOKEN = "[MASK]"
MAX_SEG_WORDS = 7  # training skips longer segs (words = pieces split on " ")
TRAIN_SLOTS = 5  # entity slots per caption in fine-tuning
EVAL_SLOTS = 10  # entity slots per caption in zero-shot extraction (EGR)
PAD = ""
GENERIC_LABEL = "object"  # a grounding label that names no entity; never used to mask


@dataclass
class EntitySlots:
    """Prompts and masked captions of one caption, padded to a fixed slot count; `n_real` are not pads."""

    prompts: list[str]
    masked: list[str]
    n_real: int


def prompt(entity: str, template: str = PROMPT_TEMPLATE) -> str:
    """'a photo containing {entity}'."""
    return template.format(entity)


def masked_caption(caption: str, entity: str) -> str:
    """The caption with every (case-sensitive) occurrence of `entity` replaced by [MASK]."""
    return caption.replace(entity, MASK_TOKEN)


def short_segs(segs: Sequence[str], max_words: int = MAX_SEG_WORDS) -> list[str]:
    """The segs training uses: at most `max_words` words each, in order."""
    return [s for s in segs if len(s.split(" ")) <= max_words]


def entity_slots(
    caption: str, entities: Sequence[str], n_slots: int, template: Optional[str] = PROMPT_TEMPLATE
) -> EntitySlots:
    """Prompts and masked captions of the first `n_slots` entities, padded with "" to `n_slots`."""
    kept = list(entities[:n_slots])
    pad = [PAD] * (n_slots - len(kept))
    return EntitySlots(
        [prompt(e, template) for e in kept] + pad,
        [masked_caption(caption, e) for e in kept] + pad,
        len(kept),
    )


def training_slots(caption: str, segs: Sequence[str]) -> EntitySlots:
    """Fine-tuning's slots: the first TRAIN_SLOTS short segs (docs/method.md §1.2)."""
    return entity_slots(caption, short_segs(segs), TRAIN_SLOTS)


def grounding_label(preds: Sequence[dict]) -> Optional[str]:
    """The grounded entity whose masked image fine-tuning uses: the first `preds` label other than "object"."""
    for entry in preds:
        for label in entry:
            if label != GENERIC_LABEL:
                return label
    return None
