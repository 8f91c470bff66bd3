"""The registry of re-rankers: name, the feature sets each needs, the README script that runs it, the
function that runs it in process; and the re-ranking chains that make the rows of the paper's tables.

A *chain* is a `+`-joined sequence of re-rankers, e.g. "EGR+TBR": at most one first-stage re-ranker
(it ranks from the features itself, replacing the plain top-k lists), then any list re-rankers (they
re-order the ranked lists of both directions). The empty chain is the plain top-k. The demo scores
chains in process (`run_chains`); the table runner runs each re-ranker's script. A new re-ranker is
one entry of RERANKERS (formulas: docs/method.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

from eval.array_ops import Ops
from eval.egr import egr_lists
from eval.feature_io import Features
from eval.predictions import as_ranked_lists
from eval.tbr import tbr_rerank
from eval.topk import topk_lists

Rows = list[tuple]  # (query id, [item ids]) per query, in feature-file order
Lists = tuple[Rows, Rows]  # (T2I rows, I2T rows)


@dataclass(frozen=True)
class RankInputs:
    """What a chain ranks from: caption and image features, the extra feature sets, list lengths."""

    ops: Ops
    text: Features
    image: Features
    extra: Mapping[str, Features]  # e.g. {"prompt": ..., "mask": ...} for EGR
    top_k: int  # length of the plain top-k lists (README: 10)
    first_stage_top_k: int  # length of a first-stage re-ranker's lists (README: 20 for EGR)
    chunk: int  # queries per pass (--eval-batch-size)


@dataclass(frozen=True)
class Reranker:
    """One re-ranking method."""

    name: str  # its name in chains and row labels
    needs: tuple[str, ...]  # feature sets it reads besides the caption and image features
    first_stage: bool  # True: ranks from the features; False: re-orders both directions' lists
    script: str  # the README script that runs it
    apply: Callable[[Lists, RankInputs], Lists]
    help: str = ""


def _egr(_: Lists, x: RankInputs) -> Lists:
    t2i, i2t = egr_lists(
        x.ops, x.text, x.image, x.extra["prompt"], x.extra["mask"], x.first_stage_top_k, x.chunk
    )
    return _ids_only(t2i), _ids_only(i2t)


def _tbr(lists: Lists, _: RankInputs) -> Lists:
    forward = as_ranked_lists("<T2I>", "query_id", lists[0])
    backward = as_ranked_lists("<I2T>", "image_id", lists[1])
    return tbr_rerank(forward, backward), tbr_rerank(backward, forward)


def _ids_only(rows: Rows) -> Rows:
    return [(q, [x[0] if isinstance(x, list) else x for x in items]) for q, items in rows]


RERANKERS: dict[str, Reranker] = {
    "EGR": Reranker(
        "EGR",
        ("prompt", "mask"),
        True,
        "eval/make_topk_predictions_mask+prompt.py",
        _egr,
        "entity-guided re-ranking of each query's 128 best candidates with its entity prompts and "
        "masked captions",
    ),
    "TBR": Reranker(
        "TBR",
        (),
        False,
        "eval/eval_back_retrieval.py",
        _tbr,
        "text-image bidirectional re-ranking: agreement of the two retrieval directions",
    ),
}

PLAIN = "plain"  # label of the empty chain
ZERO_SHOT_CHAINS = ("", "TBR", "EGR", "EGR+TBR")  # the paper's zero-shot table
FINE_TUNED_CHAINS = ("", "TBR")  # the paper re-ranks fine-tuned models with TBR only


def parse_chain(spec: str) -> tuple[Reranker, ...]:
    """ "EGR+TBR" -> (EGR, TBR); "" -> (); unknown names or a first stage after position 0 are errors."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    unknown = [n for n in names if n not in RERANKERS]
    if unknown:
        raise ValueError(f"unknown re-ranker(s) {unknown} in {spec!r}; known: {sorted(RERANKERS)}")
    chain = tuple(RERANKERS[n] for n in names)
    if any(r.first_stage for r in chain[1:]):
        raise ValueError(f"{spec!r}: a first-stage re-ranker must come first")
    return chain


def label(spec: str) -> str:
    """The row label of a chain: "plain" for the empty one, else the chain itself."""
    return "+".join(r.name for r in parse_chain(spec)) or PLAIN


def features_needed(specs: Iterable[str]) -> set[str]:
    """Extra feature sets that these chains need (e.g. {"prompt", "mask"})."""
    return {f for s in specs for r in parse_chain(s) for f in r.needs}


def run_chains(specs: Sequence[str], inputs: RankInputs) -> dict[str, Lists]:
    """Label -> (T2I rows, I2T rows) of each chain; a chain's prefix is computed once and shared."""
    done: dict[tuple[str, ...], Lists] = {}

    def lists_of(chain: tuple[Reranker, ...]) -> Lists:
        key = tuple(r.name for r in chain)
        if key not in done:
            if not chain:
                done[key] = topk_lists(
                    inputs.ops, inputs.text, inputs.image, inputs.top_k, inputs.chunk
                )
            elif chain[-1].first_stage:
                done[key] = chain[-1].apply(([], []), inputs)
            else:
                done[key] = chain[-1].apply(lists_of(chain[:-1]), inputs)
        return done[key]

    return {label(s): lists_of(parse_chain(s)) for s in specs}


def missing_features(specs: Iterable[str], available: Iterable[str]) -> Optional[str]:
    """A message naming the feature sets these chains need and `available` lacks, or None."""
    lacking = sorted(features_needed(specs) - set(available))
    return f"re-ranking needs feature set(s) {lacking}" if lacking else None
