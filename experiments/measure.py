"""Scoring one model in process: features of the evaluation split and the twins, recall rows (plain, TBR,
EGR, EGR + TBR) through the same library functions as the README's eval scripts, per-query ranks, twin scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from agree.entities import EVAL_SLOTS, entity_slots
from agree.io import InputError, read_json, read_jsonl
from agree.layout import Layout, caption_query_id, val_image_key
from agree.metrics import as_rank_array, row_from_ranks
from clip.model import CLIP
from eval.array_ops import array_ops
from eval.extraction import encode_images, encode_texts, open_images
from eval.feature_io import Features
from eval.metrics import first_gold_ranks
from eval.predictions import RankedLists, as_ranked_lists, read_ranked_lists
from eval.rerankers import (
    FINE_TUNED_CHAINS,
    ZERO_SHOT_CHAINS,
    RankInputs,
    features_needed,
    parse_chain,
    run_chains,
)
from eval.twins import TwinPairs, pair_outcomes, pair_similarities, read_twin_pairs, summarise
from synth.captions import SIZE_WORDS_TARGET
from synth.twins import TwinFiles
from synth.world import COLOUR_NAMES, SHAPES, SIZES

TOP_K, EGR_TOP_K, CHUNK, TEXT_BATCH, IMAGE_BATCH = 10, 20, 1000, 500, 250


@dataclass
class EvalSplit:
    """What a model is scored on: images, captions, ground truth both ways, entity phrases (test only)."""

    name: str
    images: Path
    captions: list[tuple[object, str]]  # (query id, text)
    t2i_gt: RankedLists
    i2t_gt: RankedLists
    caps_per_image: int
    segs: Optional[dict[str, list[str]]] = None  # str(query id) -> entity phrases


def test_split(lay: Layout) -> EvalSplit:
    """The layout's test split (captions of image k are queries 5k..5k+4, in image order)."""
    texts = read_jsonl(lay.test_texts, required=("query_id", "query_text", "item_ids"))
    segs = {
        str(r["query_id"]): r["items"]
        for r in read_jsonl(lay.test_segs, required=("query_id", "items"))
    }
    t2i = read_ranked_lists(lay.test_texts, "query_id", "ground truth")
    i2t = read_ranked_lists(lay.test_images, "image_id", "ground truth")
    per = len(t2i) // len(i2t)
    return EvalSplit(
        "test", lay.test_npz, [(r["query_id"], r["query_text"]) for r in texts], t2i, i2t, per, segs
    )


def val_split(lay: Layout) -> EvalSplit:
    """The layout's validation split: image i (npz key val_image_key(i)) with its captions as queries
    caption_query_id(i, j), the test split's scheme; no entity phrases."""
    records = read_json(lay.val_json)
    per = len(records[0]["caption"])
    if any(len(r["caption"]) != per for r in records):
        raise InputError(f"{lay.val_json}: every image needs the same number of captions")
    captions = [
        (caption_query_id(i, j), text)
        for i, r in enumerate(records)
        for j, text in enumerate(r["caption"])
    ]
    keys = [val_image_key(i) for i in range(len(records))]
    t2i = as_ranked_lists(
        lay.val_json,
        "query_id",
        [(caption_query_id(i, j), [keys[i]]) for i in range(len(records)) for j in range(per)],
    )
    i2t = as_ranked_lists(
        lay.val_json,
        "image_id",
        [(keys[i], [caption_query_id(i, j) for j in range(per)]) for i in range(len(records))],
    )
    return EvalSplit("val", lay.val_npz, captions, t2i, i2t, per)


def _texts(model: CLIP, texts: list[str]) -> np.ndarray:
    dim = int(model.text_projection.shape[1])
    parts = [
        encode_texts(model, texts[s : s + TEXT_BATCH], torch.device("cpu"), "fp32")
        for s in range(0, len(texts), TEXT_BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _images(model: CLIP, path: Path) -> Features:
    archive = open_images(path)
    ids, rows = [], []
    for keys, feats in encode_images(
        model, archive, IMAGE_BATCH, torch.device("cpu"), "fp32", progress=False
    ):
        ids += keys
        rows.append(feats)
    return Features(path, "image_id", ids, np.concatenate(rows))


def _gt_ids(ids: list[str], gt: RankedLists) -> list:
    """npz keys (strings) -> the ids the T2I ground truth gives its images, so predictions name them alike."""
    as_given = {str(x): x for items in gt.items for x in items}
    return [as_given.get(k, k) for k in ids]


@dataclass
class Scored:
    """A model's recall rows on one split and what the report needs besides."""

    rows: dict[str, dict]  # label -> {"t2i_r1", ..., "rsum"}
    ranks: dict[str, tuple]  # label -> (t2i first-gold ranks, i2t first-gold ranks), numpy
    top1: dict[str, list]  # label -> T2I top-1 item per query (query order of the split)
    twins: Optional[dict] = None


def _recall_row(split: EvalSplit, t2i: RankedLists, i2t: RankedLists) -> tuple[dict, tuple]:
    ranks = tuple(
        as_rank_array(first_gold_ranks(gt, pred))
        for gt, pred in ((split.t2i_gt, t2i), (split.i2t_gt, i2t))
    )
    return row_from_ranks(*ranks), ranks


def score(
    model: CLIP, split: EvalSplit, twins: Optional[TwinFiles], egr: bool = False, tbr: bool = True
) -> Scored:
    """Recall rows of `model` on `split`: "plain", "TBR", and with `egr` "EGR", "EGR+TBR" (the chains of
    eval.rerankers' registry; without `tbr` the chains without TBR); twin scores."""
    chains = [
        c
        for c in (ZERO_SHOT_CHAINS if egr else FINE_TUNED_CHAINS)
        if tbr or all(r.name != "TBR" for r in parse_chain(c))
    ]
    image = _images(model, split.images)
    image.ids = _gt_ids(image.ids, split.t2i_gt)
    qids = [q for q, _ in split.captions]
    text = Features(
        Path("<captions>"), "query_id", qids, _texts(model, [t for _, t in split.captions])
    )
    extra = {}
    if features_needed(chains):
        if split.segs is None:
            raise ValueError(f"EGR needs entity phrases; the {split.name} split has none")
        extra["prompt"], extra["mask"] = _slot_features(model, split, qids)
    inputs = RankInputs(array_ops("cpu"), text, image, extra, TOP_K, EGR_TOP_K, CHUNK)
    out = Scored({}, {}, {})
    for name, (t2i, i2t) in run_chains(chains, inputs).items():
        ft = as_ranked_lists(f"<{name}>", "query_id", t2i)
        fi = as_ranked_lists(f"<{name}>", "image_id", i2t)
        out.rows[name], out.ranks[name] = _recall_row(split, ft, fi)
        out.top1[name] = [items[0] if items else None for _, items in t2i]
    if twins is not None:
        out.twins = score_twin_split(model, twins)
    return out


def _slot_features(model: CLIP, split: EvalSplit, qids: list) -> tuple[Features, Features]:
    slots = [
        entity_slots(text, split.segs.get(str(q), []), EVAL_SLOTS) for q, text in split.captions
    ]
    n_real = np.array([s.n_real for s in slots], dtype=np.int64)
    flat = [t for s in slots for t in s.prompts + s.masked]
    feats = _texts(model, flat).reshape(len(slots), 2, EVAL_SLOTS, -1)
    return (
        Features(Path("<prompts>"), "query_id", qids, np.ascontiguousarray(feats[:, 0]), n_real),
        Features(Path("<masked>"), "query_id", qids, np.ascontiguousarray(feats[:, 1]), n_real),
    )


def twin_outcomes(model: CLIP, twins: TwinFiles) -> tuple[TwinPairs, dict[str, np.ndarray]]:
    """The twin pairs and each pair's text / image / group outcome for `model`."""
    pairs = read_twin_pairs(twins.pairs)
    image = _images(model, twins.images)
    records = read_jsonl(twins.texts, required=("query_id", "query_text"))
    text = Features(
        twins.texts,
        "query_id",
        [r["query_id"] for r in records],
        _texts(model, [r["query_text"] for r in records]),
    )
    return pairs, pair_outcomes(*pair_similarities(pairs, image, text, twins.pairs))


def score_twin_split(model: CLIP, twins: TwinFiles) -> dict[str, dict]:
    """Text / image / group scores (percent, with standard errors) per twin kind and over all pairs."""
    pairs, outcomes = twin_outcomes(model, twins)
    return summarise(outcomes, pairs.kinds)


_SIZE_OF_WORD = {w: size for size, words in SIZE_WORDS_TARGET.items() for w in words}


def _constraint(phrase: str) -> tuple[int, int, int]:
    """What a referring expression ("a big red circle", "the star") asks of an entity: (shape, colour, size)
    indices into an entity table, 0 meaning "any" for colour and size."""
    words = phrase.split()
    colour = next((w for w in words if w in COLOUR_NAMES), None)
    size = next((_SIZE_OF_WORD[w] for w in words if w in _SIZE_OF_WORD), None)
    return (
        SHAPES.index(words[-1]),
        0 if colour is None else 1 + COLOUR_NAMES.index(colour),
        0 if size is None else 1 + SIZES.index(size),
    )


def _entity_table(entities: list[dict]) -> np.ndarray:
    """[shape, colour or any, size or any] -> does the image hold an entity that fits."""
    table = np.zeros((len(SHAPES), 1 + len(COLOUR_NAMES), 1 + len(SIZES)), bool)
    for e in entities:
        s, c, z = (
            SHAPES.index(e["shape"]),
            1 + COLOUR_NAMES.index(e["colour"]),
            1 + SIZES.index(e["size"]),
        )
        table[s, 0, 0] = table[s, c, 0] = table[s, 0, z] = table[s, c, z] = True
    return table


def entities_found(meta: Path, split: EvalSplit, top1: list) -> dict[str, float]:
    """Percent of T2I top-1 images (`top1`, in the order of `split.captions`) that contain an entity fitting
    every entity phrase of the query ("entities": shape, colour and size as named) and that contain every
    shape the query names ("shapes"), each beside its chance level (the same share for an image drawn at
    random from the split). `meta` is the split's scene metadata, one record per image in the order of
    the split's image ground truth, its captions in the order of that image's queries."""
    records = read_jsonl(meta)
    if len(records) != len(split.i2t_gt):
        raise InputError(
            f"{meta}: {len(records)} scenes for {len(split.i2t_gt)} images of the {split.name} split"
        )
    row_of = {str(image): k for k, image in enumerate(split.i2t_gt.ids)}
    every = np.stack([_entity_table(rec["scene"]["entities"]) for rec in records])
    asks = {
        str(q): np.array([_constraint(m[0]) for m in cap["mentions"]]).reshape(-1, 3)
        for rec, queries in zip(records, split.i2t_gt.items)
        for q, cap in zip(queries, rec["captions"])
    }
    out = {"entities": [], "shapes": [], "entities_chance": [], "shapes_chance": []}
    for (q, _), item in zip(split.captions, top1):
        ask = asks[str(q)]
        bare = ask * [1, 0, 0]
        for name, want in (("entities", ask), ("shapes", bare)):
            fits = every[:, want[:, 0], want[:, 1], want[:, 2]].all(axis=1)  # [images]
            out[name].append(fits[row_of[str(item)]])
            out[name + "_chance"].append(fits.mean())
    return {k: 100 * float(np.mean(v)) for k, v in out.items()}
