"""A simulated open-vocabulary detector: the boxes a GLIP-like model would report for a synthetic scene."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from synth.captions import grounding_labels
from synth.render import mask_box
from synth.world import Scene

THRESHOLD = 0.5  # prepare_data.py's default --box-threshold
MISS_PROB = 0.1  # share of entities the detector scores below the threshold


@dataclass(frozen=True)
class Detection:
    """One box: its label, the entity it covers, its corners (0-based pixels, end exclusive) and score."""

    label: str
    entity: Optional[int]
    box: tuple[int, int, int, int]
    score: float

    def to_json(self) -> dict:
        """JSON-ready description (metadata files)."""
        return {
            "label": self.label,
            "entity": self.entity,
            "box": list(self.box),
            "score": self.score,
        }


def detections_for(scene: Scene, rng: np.random.Generator) -> list[Detection]:
    """One box per entity of a rendered scene, labelled "colour shape" or (when unique) "shape"; some missed."""
    labels = grounding_labels(scene, rng)
    out = []
    for k, (e, label) in enumerate(zip(scene.entities, labels)):
        missed = rng.random() < MISS_PROB
        score = float(rng.uniform(0.1, 0.45) if missed else rng.uniform(0.55, 0.95))
        out.append(Detection(label, k, mask_box(e, scene.resolution), round(score, 4)))
    return out
