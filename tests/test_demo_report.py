"""The demo's arithmetic: twin scores on hand-made similarities, mean / sd / paired differences, the
bootstrap sampling error, and the rows of the tables (each once)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agree.io import InputError
from eval.feature_io import Features
from eval.predictions import as_ranked_lists
from eval.twins import pair_outcomes, pair_similarities, read_twin_pairs, score_twins, summarise
from experiments.demo import Measured
from experiments.measure import EvalSplit, Scored
from experiments.report import build_rows, compare_top1, example_panels, markdown, paired
from experiments.stats import bootstrap_rsum_se, duplicate_rows, mean_sd, paired_difference, verdict
from tests._scripts import load_script

# ---------------------------------------------------------------- twin scores


def test_twin_outcomes_follow_the_winoground_definitions():
    # pairs: (s_aa, s_ab, s_ba, s_bb)
    s = np.array(
        [
            [
                0.9,
                0.1,
                0.2,
                0.8,
            ],  # both images pick their caption, both captions their image -> all three
            [
                0.9,
                0.5,
                0.95,
                0.6,
            ],  # text ok (0.9>0.5, 0.6>0.95? no) -> text fails; image: 0.9>0.95 no
            [0.9, 0.5, 0.4, 0.6],  # text: 0.9>0.5 and 0.6>0.4 yes; image: 0.9>0.4 and 0.6>0.5 yes
            [0.5, 0.6, 0.4, 0.7],  # text: 0.5>0.6 no; image: 0.5>0.4 and 0.7>0.6 yes -> image only
            [0.5, 0.5, 0.1, 0.9],  # a tie in the text comparison counts as a failure
        ]
    )
    out = pair_outcomes(*s.T)
    assert out["text"].tolist() == [True, False, True, False, False]
    assert out["image"].tolist() == [True, False, True, True, True]
    assert out["group"].tolist() == [True, False, True, False, False]


def test_twin_summary_per_kind_with_standard_errors():
    outcomes = {"text": np.array([1, 1, 0, 0, 1], bool), "image": np.array([1, 0, 0, 0, 1], bool)}
    outcomes["group"] = outcomes["text"] & outcomes["image"]
    got = summarise(outcomes, ["x", "x", "y", "y", "y"])
    assert got["x"]["n"] == 2 and got["x"]["text"] == 100 and got["x"]["image"] == 50
    assert got["y"]["text"] == pytest.approx(100 / 3)
    assert got["all"]["n"] == 5 and got["all"]["text"] == pytest.approx(60)
    assert got["all"]["text_se"] == pytest.approx(100 * math.sqrt(0.6 * 0.4 / 5))
    assert got["x"]["image_se"] == pytest.approx(100 * math.sqrt(0.25 / 2))


def _pairs_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_twin_scores_from_features_look_ids_up_as_strings(tmp_path):
    # images "10", "11" and captions 7, 8: image 10 matches caption 7, image 11 caption 8
    images = Features(Path("img"), "image_id", ["10", "11"], np.array([[1, 0], [0, 1]], np.float32))
    texts = Features(
        Path("txt"), "query_id", [7, 8], np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    )
    path = _pairs_file(
        tmp_path,
        [
            {"kind": "k", "image_a": 10, "image_b": 11, "text_a": 7, "text_b": 8},
            {"kind": "k", "image_a": 10, "image_b": 11, "text_a": 8, "text_b": 7},
        ],
    )
    pairs = read_twin_pairs(path)
    s = pair_similarities(pairs, images, texts)
    np.testing.assert_allclose(np.stack(s, 1)[0], [0.9, 0.2, 0.1, 0.8], rtol=1e-6)
    got = score_twins(pairs, images, texts)
    assert got["k"]["group"] == 50 and got["all"]["n"] == 2


def test_twin_pairs_naming_an_absent_id_are_an_error(tmp_path):
    images = Features(Path("img"), "image_id", ["10"], np.ones((1, 2), np.float32))
    texts = Features(Path("txt"), "query_id", [7, 8], np.ones((2, 2), np.float32))
    path = _pairs_file(
        tmp_path, [{"kind": "k", "image_a": 10, "image_b": 12, "text_a": 7, "text_b": 8}]
    )
    with pytest.raises(InputError, match=r"image id 12 has no feature"):
        score_twins(read_twin_pairs(path), images, texts, path)
    bad = _pairs_file(tmp_path, [{"kind": "k", "image_a": 10, "image_b": 12, "text_a": 7}])
    with pytest.raises(InputError, match=r"pairs.jsonl:1"):
        read_twin_pairs(bad)


def test_eval_twins_script_writes_scores(tmp_path):
    from eval.feature_io import FeatureWriter

    with FeatureWriter(tmp_path / "img.jsonl", "image_id") as w:
        w.add([0, 1], np.array([[1, 0], [0, 1]], np.float32))
    with FeatureWriter(tmp_path / "txt.jsonl", "query_id") as w:
        w.add([0, 1], np.array([[0.8, 0.6], [0.6, 0.8]], np.float32))
    pairs = _pairs_file(
        tmp_path, [{"kind": "binding", "image_a": 0, "image_b": 1, "text_a": 0, "text_b": 1}]
    )
    out = tmp_path / "twins.json"
    load_script("eval/eval_twins.py").main(
        [
            "--image-feats",
            str(tmp_path / "img.jsonl"),
            "--text-feats",
            str(tmp_path / "txt.jsonl"),
            "--pairs",
            str(pairs),
            "--output",
            str(out),
        ]
    )
    got = json.loads(out.read_text())
    assert got["binding"]["group"] == 100 and got["all"]["n"] == 1


# ---------------------------------------------------------------- seeds


def test_mean_sd_and_paired_difference():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_sd([5.0]) == (5.0, 0.0)
    m, s, n = paired_difference({0: 10.0, 1: 12.0, 2: 11.0, 3: 99.0}, {0: 9.0, 1: 9.0, 2: 11.0})
    assert n == 3 and m == pytest.approx(4 / 3) and s == pytest.approx(np.std([1, 3, 0], ddof=1))


def test_verdict_says_above_or_within_noise():
    assert "within noise" in verdict(0.5, 2.0, 3)
    assert "above noise" in verdict(5.0, 1.0, 3)
    assert "below noise" in verdict(-5.0, 1.0, 3)
    assert "no claim" in verdict(5.0, 0.0, 1)


def test_bootstrap_se_is_zero_for_a_constant_outcome_and_shrinks_with_more_images():
    assert bootstrap_rsum_se(np.zeros(50), np.zeros(10), 5) == 0.0
    rng = np.random.default_rng(0)
    small = bootstrap_rsum_se(rng.integers(0, 20, 500), rng.integers(0, 20, 100), 5)
    big = bootstrap_rsum_se(rng.integers(0, 20, 5000), rng.integers(0, 20, 1000), 5)
    assert 0 < big < small
    with pytest.raises(ValueError):
        bootstrap_rsum_se(np.zeros(49), np.zeros(10), 5)


# ---------------------------------------------------------------- rows


def _split(n_images=4, per=2) -> EvalSplit:
    caps = [(per * i + c, f"caption {per * i + c}") for i in range(n_images) for c in range(per)]
    t2i = as_ranked_lists("gt", "query_id", [(q, [q // per]) for q, _ in caps])
    i2t = as_ranked_lists(
        "gt", "image_id", [(i, [per * i + c for c in range(per)]) for i in range(n_images)]
    )
    return EvalSplit("test", Path("none.npz"), caps, t2i, i2t, per)


def _scored(rsum: float, variants=("plain", "TBR")) -> Scored:
    rows = {
        v: {
            "t2i_r1": rsum / 6,
            "t2i_r5": rsum / 6,
            "t2i_r10": rsum / 6,
            "i2t_r1": rsum / 6,
            "i2t_r5": rsum / 6,
            "i2t_r10": rsum / 6,
            "rsum": rsum,
        }
        for v in variants
    }
    ranks = {v: (np.zeros(8), np.zeros(4)) for v in variants}
    one = {
        "n": 4,
        "text": 50.0,
        "text_se": 25.0,
        "image": 25.0,
        "image_se": 21.7,
        "group": 25.0,
        "group_se": 21.7,
    }
    twins = {"binding": one, "all": one}
    return Scored(rows, ranks, {v: [0] * 8 for v in variants}, twins)


def test_rows_are_each_once_with_per_seed_numbers_mean_and_sd():
    measured = Measured("test", _scored(100.0, ("plain", "TBR", "EGR", "EGR+TBR")))
    for seed, (g, a) in zip((0, 1, 2), ((150, 152), (160, 158), (155, 161))):
        measured.fine_tuned[("global-only", seed)] = _scored(g)
        measured.fine_tuned[("AGREE", seed)] = _scored(a)
    rows = build_rows(measured, _split(), [("global-only", ()), ("AGREE", ("prompt",))], (0, 1, 2))
    assert [(r["section"], r["method"]) for r in rows] == [
        ("zero-shot", "CLIP"),
        ("zero-shot", "CLIP+TBR"),
        ("zero-shot", "CLIP+EGR"),
        ("zero-shot", "CLIP+EGR+TBR"),
        ("fine-tuned", "global-only"),
        ("fine-tuned", "AGREE"),
        ("fine-tuned", "AGREE+TBR"),
    ]
    assert duplicate_rows(rows) == []
    g = rows[4]
    assert [e["rsum"] for e in g["per_seed"]] == [150, 160, 155] and [
        e["seed"] for e in g["per_seed"]
    ] == [0, 1, 2]
    assert g["mean"]["rsum"] == pytest.approx(155) and g["sd"]["rsum"] == pytest.approx(5)
    assert rows[0]["per_seed"][0]["seed"] is None and rows[0]["sd"]["rsum"] == 0
    assert rows[0]["twin"]["binding"]["text"] == 50 and rows[1]["twin"] == {}
    p = paired(rows)
    assert p["n"] == 3 and p["mean"] == pytest.approx((2 - 2 + 6) / 3)
    record = {
        "preset": "default",
        "eval_split": "test",
        "recipe": {"seeds": [0, 1, 2], "data_seed": 0},
        "sizes": {"eval_images": 4, "eval_captions": 8},
        "rows": rows,
        "paired": p,
        "seconds": {"world": 1.0},
    }
    table = markdown(record)
    for r in rows:
        assert table.count(f"| {r['method']} |") == (
            2 if r["twin"] else 1
        )  # recall table (+ twin table)
    assert "155.00 ± 5.00" in table


def test_duplicate_rows_are_found():
    rows = [
        {"section": "a", "method": "x"},
        {"section": "a", "method": "y"},
        {"section": "a", "method": "x"},
    ]
    assert duplicate_rows(rows) == [("a", "x")]


def test_wins_losses_and_ties_of_two_top1_lists():
    split = _split()  # gold image of query q is q // 2
    a = [0, 0, 1, 0, 2, 2, 3, 0]
    b = [0, 1, 0, 1, 2, 2, 0, 3]
    got = compare_top1(split, a, b)
    assert (
        got["wins"].tolist() == [1, 2, 6] and got["losses"].tolist() == [3, 7] and got["ties"] == 3
    )


def test_a_one_seed_record_says_it_makes_no_claims():
    measured = Measured("test", _scored(100.0, ("plain", "TBR")))
    measured.fine_tuned[("global-only", 0)] = _scored(120.0)
    measured.fine_tuned[("AGREE", 0)] = _scored(121.0)
    rows = build_rows(measured, _split(), [("global-only", ()), ("AGREE", ("prompt",))], (0,))
    record = {
        "preset": "quick",
        "eval_split": "test",
        "recipe": {"seeds": [0], "data_seed": 0},
        "sizes": {"eval_images": 4, "eval_captions": 8},
        "rows": rows,
        "paired": paired(rows),
        "seconds": {"world": 1.0},
    }
    text = markdown(record)
    assert (
        "One training seed: a first look, no claims." in text and "no spread, so no claim" in text
    )


def _scene(*entities):
    return {"entities": [dict(zip(("shape", "colour", "size"), e)) for e in entities]}


def _caption(*phrases):
    return {"text": " and ".join(phrases), "mentions": [[p, k] for k, p in enumerate(phrases)]}


def _split_of(images: list, queries: list[list]) -> EvalSplit:
    """A split whose image i has the given query ids."""
    caps = [(q, f"caption {q}") for qs in queries for q in qs]
    t2i = as_ranked_lists(
        "gt", "query_id", [(q, [im]) for im, qs in zip(images, queries) for q in qs]
    )
    i2t = as_ranked_lists("gt", "image_id", list(zip(images, queries)))
    return EvalSplit("test", Path("none.npz"), caps, t2i, i2t, 1)


def test_entities_found_against_hand_counts_with_chance_levels(tmp_path):
    from experiments.measure import entities_found

    meta = tmp_path / "test_scenes.jsonl"
    records = [  # three test images (keyed by stem), one caption each
        {
            "stem": "11",
            "query_ids": [0],
            "scene": _scene(("circle", "red", "small"), ("star", "blue", "large")),
            "captions": [_caption("a small red circle", "the star")],
        },
        {
            "stem": "12",
            "query_ids": [1],
            "scene": _scene(("circle", "blue", "large")),
            "captions": [_caption("a big blue circle")],
        },
        {
            "stem": "13",
            "query_ids": [2],
            "scene": _scene(("star", "red", "small"), ("circle", "green", "large")),
            "captions": [_caption("a red star")],
        },
    ]
    meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    split = _split_of(["11", "12", "13"], [[0], [1], [2]])
    # query 0 -> image 13 (a circle and a star, but no small red circle); 1 -> 12 (right); 2 -> 11 (a star, not red)
    got = entities_found(meta, split, ["13", "12", "11"])
    assert got["entities"] == pytest.approx(100 / 3)
    assert got["shapes"] == pytest.approx(100)
    # images fitting each query: q0 entities {11}, shapes {11, 13}; q1 {12}, {11, 12, 13}; q2 {13}, {11, 13}
    assert got["entities_chance"] == pytest.approx(100 / 3)
    assert got["shapes_chance"] == pytest.approx(100 * (2 + 3 + 2) / 9)


def test_entities_found_follows_the_split_ground_truth_order(tmp_path):
    from experiments.measure import entities_found

    meta = tmp_path / "val_scenes.jsonl"
    records = [
        {
            "index": i,
            "stem": f"9{i}",
            "scene": _scene((shape, "red", "small")),
            "captions": [_caption(f"a {shape}"), _caption(f"a large {shape}")],
        }
        for i, shape in enumerate(("circle", "square"))
    ]
    meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    split = _split(n_images=2, per=2)
    # queries 2i, 2i+1 are image i's captions; every query retrieves image 0 (a small red circle)
    got = entities_found(meta, split, [0, 0, 0, 0])
    assert got["shapes"] == pytest.approx(50) and got["entities"] == pytest.approx(25)
    assert got["shapes_chance"] == pytest.approx(50) and got["entities_chance"] == pytest.approx(25)


def test_example_panels_show_the_whole_caption_and_the_correct_image_once():
    long_caption = (
        "a large red circle left of a small blue star, with a purple ring in the top left corner"
    )
    split = _split()
    split.captions[1] = (1, long_caption)
    a = [0, 0, 1, 0, 2, 2, 3, 0]  # AGREE top-1 per query (gold of query q is q // 2)
    b = [0, 1, 0, 1, 2, 2, 0, 3]  # global-only top-1
    shown = [("win", 1), ("loss", 3)]
    panels = example_panels(split, a, b, shown)
    (text_win, win), (_, loss) = panels
    assert text_win == long_caption  # whole, not cut
    assert win == [(0, "correct image = AGREE top-1"), (1, "global-only top-1 (wrong)")]
    assert loss == [(1, "correct image = global-only top-1"), (0, "AGREE top-1 (wrong)")]
    for (
        _,
        pair,
    ) in panels:  # the correct image appears once per row: the wrong panel is another image
        assert pair[0][0] != pair[1][0]
