"""The evaluation chain reproduces what the released scripts wrote for tests/fixtures/rerank_small."""

import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "rerank_small"
INP, EXP = FIX / "inputs", FIX / "expected"
TOL = 1e-6


def rows(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def entry_id(e):
    return e[0] if isinstance(e, list) else e


def assert_same_lists(got: Path, exp: Path, key: str) -> None:
    """Ids exactly; scores to TOL; order may differ only between near-equal scores."""
    a, b = rows(got), rows(exp)
    assert [r[key] for r in a] == [r[key] for r in b]
    for ra, rb in zip(a, b):
        ga, gb = ra["item_ids"], rb["item_ids"]
        assert len(ga) == len(gb)
        if not gb or not isinstance(gb[0], list):
            assert ga == gb, ra[key]
            continue
        assert {entry_id(e) for e in ga} == {entry_id(e) for e in gb}, ra[key]
        ref = {e[0]: e[1:] for e in gb}
        for pos, e in enumerate(ga):
            assert e[1:] == pytest.approx(ref[e[0]], abs=TOL), (ra[key], e[0])
            if e[0] != gb[pos][0]:  # a swap is only allowed between (near-)tied final scores
                assert abs(e[3] - gb[pos][3]) < TOL, (ra[key], pos)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run the zero-shot and plain chains once on the fixture inputs."""
    out = tmp_path_factory.mktemp("chain")
    common = [
        f"--image-feats={INP / 'img_feat.jsonl'}",
        f"--text-feats={INP / 'txt_feat.jsonl'}",
        "--eval-batch-size=32",
        "--device=cpu",
    ]
    assert (
        load_script("eval/make_topk_predictions.py").main(
            common
            + [
                "--top-k=10",
                f"--output-images={out / 'images_pred.jsonl'}",
                f"--output-texts={out / 'texts_pred.jsonl'}",
            ]
        )
        == 0
    )
    assert (
        load_script("eval/make_topk_predictions_mask+prompt.py").main(
            common
            + [
                f"--mask-feats={INP / 'mask_feat.jsonl'}",
                f"--prompt-feats={INP / 'prompt_feat.jsonl'}",
                "--top-k=20",
                f"--output-images={out / 'images_pred_mp.jsonl'}",
                f"--output-texts={out / 'texts_pred_mp.jsonl'}",
            ]
        )
        == 0
    )
    return out


def test_plain_topk_matches_release(chain):
    assert_same_lists(chain / "texts_pred.jsonl", EXP / "texts_pred.jsonl", "query_id")
    assert_same_lists(chain / "images_pred.jsonl", EXP / "images_pred.jsonl", "image_id")


def test_egr_matches_release(chain):
    assert_same_lists(chain / "texts_pred_mp.jsonl", EXP / "texts_pred_mp.jsonl", "query_id")
    assert_same_lists(chain / "images_pred_mp.jsonl", EXP / "images_pred_mp.jsonl", "image_id")


@pytest.mark.parametrize("suffix", ["", "_mp"])
def test_tbr_matches_release(tmp_path, suffix, capsys):
    tbr = load_script("eval/eval_back_retrieval.py")
    img_out, txt_out = tmp_path / "img.jsonl", tmp_path / "txt.jsonl"
    assert (
        tbr.main(
            [
                str(INP / "test_images.jsonl"),
                str(EXP / f"images_pred{suffix}.jsonl"),
                str(INP / "test_texts.jsonl"),
                str(EXP / f"texts_pred{suffix}.jsonl"),
                str(img_out),
                str(txt_out),
            ]
        )
        == 0
    )
    assert rows(img_out) == rows(EXP / f"images_pred{suffix}_rerank.jsonl")
    assert rows(txt_out) == rows(EXP / f"texts_pred{suffix}_rerank.jsonl")
    # printed recall: T2I forward, T2I re-ranked, I2T forward, I2T re-ranked, as [mean, R@1, R@5, R@10]
    printed = [json.loads(line.split(": ", 1)[1]) for line in capsys.readouterr().out.splitlines()]
    names = [
        f"texts_pred{suffix}",
        f"texts_pred{suffix}_rerank",
        f"images_pred{suffix}",
        f"images_pred{suffix}_rerank",
    ]
    for got, name in zip(printed, names):
        sj = json.loads((EXP / f"score_{name}.json").read_text())["scoreJson"]
        assert got == [pytest.approx(sj["mean_recall"], abs=1e-9), sj["r1"], sj["r5"], sj["r10"]]


@pytest.mark.parametrize(
    "name",
    [
        "texts_pred",
        "texts_pred_rerank",
        "texts_pred_mp",
        "texts_pred_mp_rerank",
        "images_pred",
        "images_pred_rerank",
        "images_pred_mp",
        "images_pred_mp_rerank",
    ],
)
def test_evaluation_matches_release(tmp_path, name):
    gt, key = (
        (INP / "test_texts.jsonl", "query_id")
        if name.startswith("texts")
        else (INP / "test_images.jsonl", "image_id")
    )
    out = tmp_path / "score.json"
    assert (
        load_script("eval/evaluation.py").main([str(gt), str(EXP / f"{name}.jsonl"), str(out), key])
        == 0
    )
    assert out.read_bytes() == (EXP / f"score_{name}.json").read_bytes()  # same floats, same layout


def test_zero_shot_chain_scores_match_release(chain, tmp_path):
    """Our EGR output through our TBR and evaluation gives the release's recall JSON."""
    load_script("eval/eval_back_retrieval.py").main(
        [
            str(INP / "test_images.jsonl"),
            str(chain / "images_pred_mp.jsonl"),
            str(INP / "test_texts.jsonl"),
            str(chain / "texts_pred_mp.jsonl"),
            str(tmp_path / "i.jsonl"),
            str(tmp_path / "t.jsonl"),
        ]
    )
    ev = load_script("eval/evaluation.py")
    ev.main(
        [
            str(INP / "test_texts.jsonl"),
            str(tmp_path / "t.jsonl"),
            str(tmp_path / "t.json"),
            "query_id",
        ]
    )
    ev.main(
        [
            str(INP / "test_images.jsonl"),
            str(tmp_path / "i.jsonl"),
            str(tmp_path / "i.json"),
            "image_id",
        ]
    )
    assert json.loads((tmp_path / "t.json").read_text()) == json.loads(
        (EXP / "score_texts_pred_mp_rerank.json").read_text()
    )
    assert json.loads((tmp_path / "i.json").read_text()) == json.loads(
        (EXP / "score_images_pred_mp_rerank.json").read_text()
    )


def test_binary_features_and_other_chunk_sizes_give_the_same_lists(chain, tmp_path):
    conv = load_script("scripts/convert_features.py")
    for name in ("img_feat", "txt_feat", "prompt_feat", "mask_feat"):
        assert conv.main([str(INP / f"{name}.jsonl"), str(tmp_path / f"{name}.npy")]) == 0
    egr = load_script("eval/make_topk_predictions_mask+prompt.py")
    assert (
        egr.main(
            [
                f"--image-feats={tmp_path / 'img_feat.npy'}",
                f"--text-feats={tmp_path / 'txt_feat.npy'}",
                f"--mask-feats={tmp_path / 'mask_feat.npy'}",
                f"--prompt-feats={tmp_path / 'prompt_feat.npy'}",
                "--top-k=20",
                "--eval-batch-size=7",
                "--device=cpu",
                f"--output-images={tmp_path / 'i.jsonl'}",
                f"--output-texts={tmp_path / 't.jsonl'}",
            ]
        )
        == 0
    )
    assert_same_lists(tmp_path / "t.jsonl", EXP / "texts_pred_mp.jsonl", "query_id")
    assert_same_lists(tmp_path / "i.jsonl", EXP / "images_pred_mp.jsonl", "image_id")


def test_converter_round_trip_keeps_ids_and_values(tmp_path):
    conv = load_script("scripts/convert_features.py")
    src = INP / "prompt_feat.jsonl"
    assert conv.main([str(src), str(tmp_path / "p.npy")]) == 0
    assert (tmp_path / "p.ids.json").is_file()
    assert conv.main([str(tmp_path / "p.npy"), str(tmp_path / "p.jsonl")]) == 0
    a, b = rows(src), rows(tmp_path / "p.jsonl")
    assert [r["query_id"] for r in a] == [r["query_id"] for r in b]
    np.testing.assert_allclose(
        [r["feature"] for r in b], [r["feature"] for r in a], rtol=0, atol=1e-7
    )


def test_fixture_is_a_copy_inside_the_repo():
    """The project never reads ../shared at run or test time."""
    assert FIX.is_dir() and not FIX.is_symlink()
    assert all(p.resolve().is_relative_to(ROOT) for p in FIX.rglob("*"))


def test_faiss_first_stage_gives_the_release_lists(tmp_path):
    pytest.importorskip("faiss")  # optional dependency
    common = [
        f"--image-feats={INP / 'img_feat.jsonl'}",
        f"--text-feats={INP / 'txt_feat.jsonl'}",
        "--faiss",
    ]
    assert (
        load_script("eval/make_topk_predictions.py").main(
            common
            + [
                "--top-k=10",
                f"--output-images={tmp_path / 'i.jsonl'}",
                f"--output-texts={tmp_path / 't.jsonl'}",
            ]
        )
        == 0
    )
    assert (
        load_script("eval/make_topk_predictions_mask+prompt.py").main(
            common
            + [
                f"--mask-feats={INP / 'mask_feat.jsonl'}",
                f"--prompt-feats={INP / 'prompt_feat.jsonl'}",
                "--top-k=20",
                f"--output-images={tmp_path / 'im.jsonl'}",
                f"--output-texts={tmp_path / 'tm.jsonl'}",
            ]
        )
        == 0
    )
    assert_same_lists(tmp_path / "t.jsonl", EXP / "texts_pred.jsonl", "query_id")
    assert_same_lists(tmp_path / "i.jsonl", EXP / "images_pred.jsonl", "image_id")
    assert_same_lists(tmp_path / "tm.jsonl", EXP / "texts_pred_mp.jsonl", "query_id")
    assert_same_lists(tmp_path / "im.jsonl", EXP / "images_pred_mp.jsonl", "image_id")


def test_torch_path_gives_the_release_lists(tmp_path):
    """The CUDA path's code (torch), run on the CPU, reproduces the fixture as the numpy path does."""
    from eval.array_ops import TorchOps
    from eval.egr import egr_lists
    from eval.feature_io import read_retrieval_features, read_slot_features
    from eval.predictions import write_ranked_lists
    from eval.topk import topk_lists

    ops = TorchOps("cpu")
    image, text = read_retrieval_features(INP / "img_feat.jsonl", INP / "txt_feat.jsonl")
    prompt, mask = (
        read_slot_features(INP / "prompt_feat.jsonl", text),
        read_slot_features(INP / "mask_feat.jsonl", text),
    )
    t2i, i2t = topk_lists(ops, text, image, 10, 32)
    t2i_mp, i2t_mp = egr_lists(ops, text, image, prompt, mask, 20, 32)
    write_ranked_lists(
        (tmp_path / "t.jsonl", "query_id", t2i),
        (tmp_path / "i.jsonl", "image_id", i2t),
        (tmp_path / "tm.jsonl", "query_id", t2i_mp),
        (tmp_path / "im.jsonl", "image_id", i2t_mp),
    )
    assert_same_lists(tmp_path / "t.jsonl", EXP / "texts_pred.jsonl", "query_id")
    assert_same_lists(tmp_path / "i.jsonl", EXP / "images_pred.jsonl", "image_id")
    assert_same_lists(tmp_path / "tm.jsonl", EXP / "texts_pred_mp.jsonl", "query_id")
    assert_same_lists(tmp_path / "im.jsonl", EXP / "images_pred_mp.jsonl", "image_id")
