"""Published numbers for the settings the table runner reproduces, each with its source.

Only numbers read in a cited source are here (percent, the row keys of `agree.metrics`). Not here, because
no source for them could be read when this file was written: the AGREE paper's own tables (WSDM 2023; no
copy of the paper was reachable) and the CLIP paper's zero-shot retrieval table (its numbers are for
ViT-L/14 at 336 px, another setting than the recipe's 224-px ViT-L/14, and its text could not be read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from agree.metrics import RECALL_KEYS


@dataclass(frozen=True)
class Reference:
    """Published recalls for one row of the tables."""

    dataset: str  # "flickr30k" or "coco" (the layout's dataset name)
    model: str  # model config name, '/' written '-' (e.g. "ViT-L-14": OpenAI's weights)
    method: str  # the runner's row label, e.g. "CLIP" (zero-shot) or "AGREE+TBR"
    values: Mapping[str, float]  # some of agree.metrics.RECALL_KEYS, percent
    source: str  # short name, shown in results.md
    url: str  # where the numbers are (a fixed commit where there is one)
    note: str = ""  # how the source's setting relates to the row's


OPENCLIP_CSV = (
    "https://github.com/mlfoundations/open_clip/blob/05e7db4987eda177906dc164b4c3ebeb39a9991a/"
    "docs/openclip_retrieval_results.csv"
)
OPENCLIP_NOTE = (
    "OpenCLIP's zero-shot retrieval results (row ViT-L-14, pretrained openai), measured with "
    "CLIP_benchmark; its image retrieval is T→I, its text retrieval I→T; fractions there, percent here"
)
RELEASE_README = (
    "https://github.com/alibaba/EasyNLP/blob/074e5dfbb08cafa2e3ad14b0394364ec1513a258/"
    "examples/agree/README.md"
)

REFERENCES: tuple[Reference, ...] = (
    # openclip_retrieval_results.csv, row "ViT-L-14,openai,...": Flickr image retr. R@1/5/10 0.6496 0.8724
    # 0.9204, Flickr text retr. R@1/5/10 0.8520 0.9740 0.9920, MSCOCO image retr. 0.3651 0.6106 0.7113,
    # MSCOCO text retr. 0.5634 0.7938 0.8660
    Reference(
        "flickr30k",
        "ViT-L-14",
        "CLIP",
        {
            "t2i_r1": 64.96,
            "t2i_r5": 87.24,
            "t2i_r10": 92.04,
            "i2t_r1": 85.20,
            "i2t_r5": 97.40,
            "i2t_r10": 99.20,
        },
        "OpenCLIP retrieval results",
        OPENCLIP_CSV,
        OPENCLIP_NOTE,
    ),
    Reference(
        "coco",
        "ViT-L-14",
        "CLIP",
        {
            "t2i_r1": 36.51,
            "t2i_r5": 61.06,
            "t2i_r10": 71.13,
            "i2t_r1": 56.34,
            "i2t_r5": 79.38,
            "i2t_r10": 86.60,
        },
        "OpenCLIP retrieval results",
        OPENCLIP_CSV,
        OPENCLIP_NOTE,
    ),
    # The release's README, "Fine-tuning" > "Evaluation": the output it shows of evaluation.py on
    # image_output_rerank.json (image queries of the fine-tuned model after TBR): r1 89.9, r5 98.4, r10 99.5
    Reference(
        "flickr30k",
        "ViT-L-14",
        "AGREE+TBR",
        {"i2t_r1": 89.9, "i2t_r5": 98.4, "i2t_r10": 99.5},
        "the release's README",
        RELEASE_README,
        "the example output the README shows for evaluation.py on the fine-tuned model's TBR-re-ranked "
        "image queries (I→T); the README does not say which run produced it",
    ),
)


def references_for(dataset: str, model: str, method: str) -> list[Reference]:
    """The published numbers for this row's setting (none when there are none)."""
    model = model.replace("/", "-")
    return [r for r in REFERENCES if (r.dataset, r.model, r.method) == (dataset, model, method)]


def difference(row: Mapping[str, float], ref: Reference) -> dict[str, float]:
    """This row minus the published values, for the recalls the source gives (and RSUM if it gives all six)."""
    out = {k: round(row[k] - v, 2) for k, v in ref.values.items()}
    if set(ref.values) == set(RECALL_KEYS):
        out["rsum"] = round(row["rsum"] - sum(ref.values.values()), 2)
    return out
