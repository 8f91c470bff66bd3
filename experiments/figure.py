"""A picture of retrieval results: each caption's top-5 images before and after re-ranking."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from agree.images import ImageArchive
from agree.io import atomic_path, read_jsonl
from clip.transform import MEAN, STD
from eval.predictions import RankedLists, read_ranked_lists


def displayable(arr: np.ndarray) -> np.ndarray:
    """A stored image array (uint8 HWC or CLIP-normalised float CHW) as uint8 HWC."""
    if arr.dtype == np.uint8:
        return arr
    img = arr.transpose(1, 2, 0) * np.array(STD) + np.array(MEAN)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _as_strings(lists: RankedLists) -> dict[str, list[str]]:
    return {str(q): [str(x) for x in items] for q, items in zip(lists.ids, lists.items)}


def pick_examples(
    gold: dict[str, set[str]], before: dict[str, list[str]], after: dict[str, list[str]], n: int
) -> list[str]:
    """Query ids to show: first those whose gold image rose the most, then any, in file order."""

    def rank(ids: list[str], q: str) -> int:
        return next((i for i, x in enumerate(ids) if x in gold[q]), len(ids))

    shared = [q for q in before if q in after and q in gold]
    gain = {q: rank(before[q], q) - rank(after[q], q) for q in shared}
    improved = sorted(
        (q for q in shared if gain[q] > 0 and rank(after[q], q) < 5), key=lambda q: -gain[q]
    )
    rest = [q for q in shared if q not in improved]
    return (improved + rest)[:n]


def draw_retrieval_examples(
    texts_gt: Path, images_npz: Path, before_pred: Path, after_pred: Path, out: Path, n: int = 4
) -> None:
    """Draw `n` captions with their top-5 images before and after re-ranking; gold images framed green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captions = {
        str(r["query_id"]): r for r in read_jsonl(texts_gt, ["query_id", "query_text", "item_ids"])
    }
    gold = {q: {str(i) for i in r["item_ids"]} for q, r in captions.items()}
    before = _as_strings(read_ranked_lists(before_pred, "query_id"))
    after = _as_strings(read_ranked_lists(after_pred, "query_id"))
    queries = pick_examples(gold, before, after, n)
    archive = ImageArchive(images_npz)

    fig, axes = plt.subplots(2 * len(queries), 5, figsize=(7.5, 3.3 * len(queries)), squeeze=False)
    for row, q in enumerate(queries):
        for half, (name, ranked) in enumerate(
            (("before", before[q]), ("after EGR + TBR", after[q]))
        ):
            for col in range(5):
                ax = axes[2 * row + half][col]
                ax.set_xticks([])
                ax.set_yticks([])
                if col >= len(ranked):
                    ax.axis("off")
                    continue
                ax.imshow(displayable(archive[ranked[col]]))
                hit = ranked[col] in gold[q]
                for side in ax.spines.values():
                    side.set_edgecolor("limegreen" if hit else "lightgrey")
                    side.set_linewidth(5 if hit else 1)
                if col == 0:
                    ax.set_ylabel(name, fontsize=9)
            if half == 0:
                axes[2 * row][0].set_title(
                    f"“{captions[q]['query_text']}”", loc="left", fontsize=10, x=0
                )
    fig.suptitle("Top-5 images per caption; the correct image is framed green", fontsize=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout may warn about long captions
        fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
