"""The two concept owners of scoring: agree.metrics (recall at K, RSUM, the row schema) and
eval.rerankers (the registry of re-rankers and the chains of the paper's tables)."""

from pathlib import Path

import numpy as np
import orjson
import pytest

from agree.metrics import ABSENT, KS, ROW_KEYS, hits, recall_at_k, retrieval_row, row_from_ranks
from eval.array_ops import array_ops
from eval.feature_io import read_features
from eval.rerankers import (
    FINE_TUNED_CHAINS,
    RERANKERS,
    ZERO_SHOT_CHAINS,
    RankInputs,
    features_needed,
    label,
    parse_chain,
    run_chains,
)

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "rerank_small"


# --------------------------------------------------------------------------- metrics
def test_recall_at_k_by_hand():
    # ranks 0, 3, 7, absent (None), 12 of five queries
    r = recall_at_k([0, 3, 7, None, 12])
    assert r["r1"] == pytest.approx(20.0)
    assert r["r5"] == pytest.approx(40.0)
    assert r["r10"] == pytest.approx(60.0)
    assert r["mean"] == pytest.approx(40.0)


def test_recall_arithmetic_is_fractions_first_then_percent():
    # 1/3 * 100 and 100 * 1 / 3 differ in the last bit; the released evaluation computes the former
    r = recall_at_k(np.array([0, ABSENT, ABSENT]))
    assert r["r1"] == (1 / 3) * 100


def test_row_schema_and_rsum():
    row = row_from_ranks([0, 1, 20], [0, 5])
    assert tuple(row) == ROW_KEYS
    assert row["t2i_r1"] == pytest.approx(100 / 3) and row["i2t_r5"] == pytest.approx(50.0)
    assert row["rsum"] == pytest.approx(sum(row[k] for k in ROW_KEYS[:-1]))
    same = retrieval_row(recall_at_k([0, 1, 20]), recall_at_k([0, 5]))
    assert same == row


def test_hits_matrix():
    h = hits([0, 4, ABSENT])
    assert h.shape == (3, len(KS))
    assert h.tolist() == [[True, True, True], [False, True, True], [False, False, False]]


# --------------------------------------------------------------------------- re-rankers
def test_registry_entries_are_complete():
    for name, r in RERANKERS.items():
        assert r.name == name and "+" not in name
        assert (ROOT / r.script).is_file(), r.script
        assert callable(r.apply) and r.help
        assert set(r.needs) <= {"prompt", "mask"}
    for chain in ZERO_SHOT_CHAINS + FINE_TUNED_CHAINS:
        parse_chain(chain)  # every table chain names registered re-rankers in a valid order
    assert features_needed(FINE_TUNED_CHAINS) == set()
    assert features_needed(ZERO_SHOT_CHAINS) == {"prompt", "mask"}


def test_chain_parsing_errors():
    assert label("") == "plain" and label("EGR+TBR") == "EGR+TBR"
    with pytest.raises(ValueError, match="unknown re-ranker"):
        parse_chain("TBR+XYZ")
    with pytest.raises(ValueError, match="must come first"):
        parse_chain("TBR+EGR")


def _expected_ids(name: str, key: str) -> list:
    rows = [orjson.loads(x) for x in (FIX / "expected" / name).read_bytes().splitlines() if x]
    return [(r[key], [e[0] if isinstance(e, list) else e for e in r["item_ids"]]) for r in rows]


def test_run_chains_gives_the_released_scripts_lists():
    """In-process chains equal what the released scripts wrote for the fixture (ids, in order)."""
    inp = FIX / "inputs"
    feats = {
        n: read_features(inp / f"{n}_feat.jsonl", key, slots=n in ("prompt", "mask"))
        for n, key in (
            ("img", "image_id"),
            ("txt", "query_id"),
            ("prompt", "query_id"),
            ("mask", "query_id"),
        )
    }
    inputs = RankInputs(
        array_ops("cpu"),
        feats["txt"],
        feats["img"],
        {"prompt": feats["prompt"], "mask": feats["mask"]},
        top_k=10,
        first_stage_top_k=20,
        chunk=32,
    )
    got = run_chains(ZERO_SHOT_CHAINS, inputs)
    assert list(got) == ["plain", "TBR", "EGR", "EGR+TBR"]
    files = {"plain": "pred", "TBR": "pred_rerank", "EGR": "pred_mp", "EGR+TBR": "pred_mp_rerank"}
    for name, stem in files.items():
        t2i, i2t = got[name]
        assert t2i == _expected_ids(f"texts_{stem}.jsonl", "query_id"), name
        assert i2t == _expected_ids(f"images_{stem}.jsonl", "image_id"), name
