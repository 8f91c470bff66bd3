"""Test folds (MSCOCO's 1k protocol): rankings within each fold, TBR and recall averaged over folds."""

import json
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script

from agree.io import InputError
from eval.folds import fold_bounds
from eval.metrics import recall
from eval.predictions import as_ranked_lists, read_ranked_lists

TOPK = load_script("eval/make_topk_predictions.py")
EGR = load_script("eval/make_topk_predictions_mask+prompt.py")
TBR = load_script("eval/eval_back_retrieval.py")
EVAL = load_script("eval/evaluation.py")

N_IMG, CAPS, DIM, SLOTS, FOLDS = 12, 3, 6, 2, 3


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 images with 3 captions each, listed image by image: 3 folds of 4 images and 12 captions."""
    d = tmp_path_factory.mktemp("folds")
    rng = np.random.default_rng(0)
    img = unit(rng.standard_normal((N_IMG, DIM)))
    owner = np.repeat(np.arange(N_IMG), CAPS)
    txt = unit(img[owner] + 0.8 * rng.standard_normal((len(owner), DIM)))
    slots = {
        n: unit(txt[:, None] + rng.standard_normal((len(owner), SLOTS, DIM)))
        for n in ("prompt", "mask")
    }
    img_ids = [str(500 + i) for i in range(N_IMG)]
    paths = {
        "img": write_jsonl(
            d / "img.jsonl", [{"image_id": i, "feature": f.tolist()} for i, f in zip(img_ids, img)]
        ),
        "txt": write_jsonl(
            d / "txt.jsonl", [{"query_id": q, "feature": f.tolist()} for q, f in enumerate(txt)]
        ),
        "img_gt": write_jsonl(
            d / "img_gt.jsonl",
            [
                {"image_id": int(i), "item_ids": np.flatnonzero(owner == j).tolist()}
                for j, i in enumerate(img_ids)
            ],
        ),
        "txt_gt": write_jsonl(
            d / "txt_gt.jsonl",
            [{"query_id": q, "item_ids": [int(img_ids[o])]} for q, o in enumerate(owner)],
        ),
    }
    for n, f in slots.items():
        paths[n] = write_jsonl(
            d / f"{n}.jsonl", [{"query_id": q, "feature": s.tolist()} for q, s in enumerate(f)]
        )
    return dict(
        paths,
        dir=d,
        img_array=img.astype(np.float32),
        txt_array=txt.astype(np.float32),
        img_ids=img_ids,
    )


def feats_args(data, out: Path, *extra):
    return [
        f"--image-feats={data['img']}",
        f"--text-feats={data['txt']}",
        f"--output-images={out / 'i.jsonl'}",
        f"--output-texts={out / 't.jsonl'}",
        *extra,
    ]


def test_fold_bounds_cover_every_position_once():
    assert fold_bounds(5000, 5) == [
        (0, 1000),
        (1000, 2000),
        (2000, 3000),
        (3000, 4000),
        (4000, 5000),
    ]
    assert fold_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]


def test_topk_with_folds_ranks_each_query_among_its_folds_items_only(data, tmp_path):
    assert TOPK.main(feats_args(data, tmp_path, f"--folds={FOLDS}", "--top-k=10")) == 0
    t2i = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    i2t = [json.loads(x) for x in (tmp_path / "i.jsonl").read_text().splitlines()]
    s = data["txt_array"].astype(np.float64) @ data["img_array"].T.astype(np.float64)
    per_fold_img, per_fold_txt = N_IMG // FOLDS, N_IMG * CAPS // FOLDS
    for q, rec in enumerate(t2i):  # oracle: a full sort of the fold's scores
        f = q // per_fold_txt
        cols = np.arange(f * per_fold_img, (f + 1) * per_fold_img)
        want = [data["img_ids"][c] for c in cols[np.argsort(-s[q, cols], kind="stable")]]
        assert rec == {
            "query_id": q,
            "item_ids": want,
            "fold": f,
        }  # 4 items: the list is shorter than --top-k
    for j, rec in enumerate(i2t):
        f = j // per_fold_img
        rows = np.arange(f * per_fold_txt, (f + 1) * per_fold_txt)
        assert rec == {
            "image_id": data["img_ids"][j],
            "item_ids": rows[np.argsort(-s[rows, j], kind="stable")][:10].tolist(),
            "fold": f,
        }


def test_egr_with_folds_equals_egr_on_each_fold_alone(data, tmp_path):
    """The fold run's lists are those of EGR run on each fold's own feature files."""
    d = tmp_path
    slot_args = [
        f"--mask-feats={data['mask']}",
        f"--prompt-feats={data['prompt']}",
        "--top-k=5",
        "--pool-size=3",
    ]
    assert EGR.main(feats_args(data, d / "all", f"--folds={FOLDS}", *slot_args)) == 0
    got_t = read_ranked_lists(d / "all" / "t.jsonl", "query_id")
    got_i = read_ranked_lists(d / "all" / "i.jsonl", "image_id")
    assert got_t.folds == [q // 12 for q in range(36)] and got_i.folds == [
        i // 4 for i in range(12)
    ]
    lines = {n: Path(data[n]).read_text().splitlines() for n in ("img", "txt", "prompt", "mask")}
    for f in range(FOLDS):
        sub = d / f"fold{f}"
        sub.mkdir()
        for n, rows in lines.items():
            per = len(rows) // FOLDS
            (sub / f"{n}.jsonl").write_text("\n".join(rows[f * per : (f + 1) * per]) + "\n")
        assert (
            EGR.main(
                [
                    f"--image-feats={sub / 'img.jsonl'}",
                    f"--text-feats={sub / 'txt.jsonl'}",
                    f"--mask-feats={sub / 'mask.jsonl'}",
                    f"--prompt-feats={sub / 'prompt.jsonl'}",
                    "--top-k=5",
                    "--pool-size=3",
                    f"--output-images={sub / 'i.jsonl'}",
                    f"--output-texts={sub / 't.jsonl'}",
                ]
            )
            == 0
        )
        for name, got in (("t.jsonl", got_t), ("i.jsonl", got_i)):
            alone = read_ranked_lists(sub / name, got.key)
            assert alone.folds is None
            for qid, items in zip(alone.ids, alone.items):
                assert got.get(qid) == items


def test_tbr_and_evaluation_average_the_recall_of_the_folds(data, tmp_path):
    assert TOPK.main(feats_args(data, tmp_path, f"--folds={FOLDS}", "--top-k=3")) == 0
    assert (
        TBR.main(
            [
                str(data["img_gt"]),
                str(tmp_path / "i.jsonl"),
                str(data["txt_gt"]),
                str(tmp_path / "t.jsonl"),
                str(tmp_path / "ir.jsonl"),
                str(tmp_path / "tr.jsonl"),
            ]
        )
        == 0
    )
    reranked = read_ranked_lists(tmp_path / "tr.jsonl", "query_id")
    assert reranked.folds == [q // 12 for q in range(36)]  # TBR keeps each row's fold
    assert (
        EVAL.main(
            [str(data["txt_gt"]), str(tmp_path / "tr.jsonl"), str(tmp_path / "s.json"), "query_id"]
        )
        == 0
    )
    record = json.loads((tmp_path / "s.json").read_text())
    # oracle: recall over each fold's 12 queries alone (lists without folds), averaged
    gt = read_ranked_lists(data["txt_gt"], "query_id", "ground truth")
    per_fold = []
    for f in range(FOLDS):
        rows = [(q, reranked.items[q]) for q in range(36) if q // 12 == f]
        gt_f = as_ranked_lists("gt", "query_id", [(q, gt.items[q]) for q, _ in rows])
        per_fold.append(recall(gt_f, as_ranked_lists("p", "query_id", rows)))
    score = record["scoreJson"]
    for k in ("r1", "r5", "r10"):
        assert score[k] == pytest.approx(sum(r[k] for r in per_fold) / FOLDS, abs=1e-12)
    assert score["mean_recall"] == pytest.approx(
        sum(r["mean"] for r in per_fold) / FOLDS, abs=1e-12
    )
    assert [f["queries"] for f in score["folds"]] == [12, 12, 12]
    assert set(record) == {"success", "score", "scoreJson"}


def test_recall_over_folds_on_a_hand_example():
    gt = as_ranked_lists("gt", "query_id", [(0, ["a"]), (1, ["b"]), (2, ["c"])])
    # fold 0: queries 0 (hit at 1) and 1 (miss); fold 1: query 2 (hit at 2)
    pred = as_ranked_lists(
        "p", "query_id", [(0, ["a", "b"], 0), (1, ["a", "b"], 0), (2, ["d", "c"], 1)]
    )
    pred.items[1] = ["a"]
    r = recall(gt, pred)
    assert r["r1"] == pytest.approx((50.0 + 0.0) / 2)
    assert r["r5"] == pytest.approx((50.0 + 100.0) / 2)
    assert [f["queries"] for f in r["folds"]] == [2, 1]


def test_gold_item_ranked_in_another_fold_is_an_error():
    gt = as_ranked_lists("gt.jsonl", "query_id", [(0, ["a"]), (1, ["c"])])
    pred = as_ranked_lists(
        "p.jsonl", "query_id", [(0, ["a", "b"], 0), (1, ["d", "e"], 1), (2, ["c"], 0)]
    )
    with pytest.raises(
        InputError, match=r"gt.jsonl:2: gold item 'c' of query_id 1 \(fold 1\) is ranked in fold 0"
    ):
        recall(gt, pred)


def test_predictions_with_and_without_folds_do_not_mix(data, tmp_path):
    assert TOPK.main(feats_args(data, tmp_path / "f", f"--folds={FOLDS}")) == 0
    assert TOPK.main(feats_args(data, tmp_path / "n")) == 0
    with pytest.raises(InputError, match="records test folds"):
        TBR.main(
            [
                str(data["img_gt"]),
                str(tmp_path / "n" / "i.jsonl"),
                str(data["txt_gt"]),
                str(tmp_path / "f" / "t.jsonl"),
                str(tmp_path / "ir.jsonl"),
                str(tmp_path / "tr.jsonl"),
            ]
        )
    bad = tmp_path / "mixed.jsonl"
    bad.write_text(
        '{"query_id": 0, "item_ids": [1], "fold": 0}\n{"query_id": 1, "item_ids": [1]}\n'
    )
    with pytest.raises(InputError, match=r"mixed.jsonl:2: 'fold' present on some lines only"):
        read_ranked_lists(bad, "query_id")
    with pytest.raises(InputError, match="--folds 40"):
        TOPK.main(feats_args(data, tmp_path / "x", "--folds=40"))
    assert not (tmp_path / "x").exists()
