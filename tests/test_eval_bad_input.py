"""Bad input: a clear error naming the file (and line), non-zero exit, no traceback, no output left."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script

from agree.io import InputError

ROOT = Path(__file__).resolve().parents[1]


EGR = load_script("eval/make_topk_predictions_mask+prompt.py")
TOPK = load_script("eval/make_topk_predictions.py")
TBR = load_script("eval/eval_back_retrieval.py")
EVAL = load_script("eval/evaluation.py")
CONV = load_script("scripts/convert_features.py")


def write_lines(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    """Valid small inputs: 4 images, 8 captions, 3-d, 2 slots; outputs go to tmp_path/out."""
    rng = np.random.default_rng(0)
    d = {}
    d["img"] = write_lines(
        tmp_path / "img.jsonl",
        [{"image_id": str(i), "feature": rng.random(3).tolist()} for i in range(4)],
    )
    d["txt"] = write_lines(
        tmp_path / "txt.jsonl",
        [{"query_id": q, "feature": rng.random(3).tolist()} for q in range(8)],
    )
    for name in ("prompt", "mask"):
        d[name] = write_lines(
            tmp_path / f"{name}.jsonl",
            [{"query_id": q, "feature": rng.random((2, 3)).tolist()} for q in range(8)],
        )
    d["img_gt"] = write_lines(
        tmp_path / "img_gt.jsonl",
        [{"image_id": i, "item_ids": [2 * i, 2 * i + 1]} for i in range(4)],
    )
    d["txt_gt"] = write_lines(
        tmp_path / "txt_gt.jsonl", [{"query_id": q, "item_ids": [q // 2]} for q in range(8)]
    )
    d["out"] = tmp_path / "out"
    return d


def egr_args(d, **over):
    paths = {
        "image-feats": d["img"],
        "text-feats": d["txt"],
        "mask-feats": d["mask"],
        "prompt-feats": d["prompt"],
    }
    paths.update(over)
    return [f"--{k}={v}" for k, v in paths.items()] + [
        "--top-k=3",
        "--device=cpu",
        f"--output-images={d['out'] / 'i.jsonl'}",
        f"--output-texts={d['out'] / 't.jsonl'}",
    ]


def assert_fails(main, argv, *fragments, out_dir=None):
    with pytest.raises(InputError) as err:
        main(argv)
    msg = str(err.value)
    for f in fragments:
        assert f in msg, msg
    if out_dir is not None:
        assert (
            not out_dir.exists() or list(out_dir.iterdir()) == []
        )  # nothing written, no temp files
    return msg


def test_valid_inputs_run(data):
    assert EGR.main(egr_args(data)) == 0
    assert sorted(p.name for p in data["out"].iterdir()) == ["i.jsonl", "t.jsonl"]


def test_malformed_json_line(data):
    lines = data["img"].read_text().splitlines()
    lines[2] = lines[2][:-5]
    data["img"].write_text("\n".join(lines) + "\n")
    assert_fails(EGR.main, egr_args(data), "img.jsonl:3", "malformed JSON", out_dir=data["out"])


def test_missing_key(data):
    lines = data["txt"].read_text().splitlines()
    lines[1] = json.dumps({"query_id": 1})
    data["txt"].write_text("\n".join(lines) + "\n")
    assert_fails(EGR.main, egr_args(data), "txt.jsonl:2", "'feature'", out_dir=data["out"])


def test_inconsistent_feature_dimension_within_a_file(data):
    lines = data["img"].read_text().splitlines()
    lines[3] = json.dumps({"image_id": "3", "feature": [0.1, 0.2]})
    data["img"].write_text("\n".join(lines) + "\n")
    assert_fails(
        TOPK.main,
        egr_args(data)[:2] + egr_args(data)[4:],
        "img.jsonl:4",
        "[2]",
        "[3]",
        out_dir=data["out"],
    )


def test_inconsistent_slot_count(data):
    lines = data["prompt"].read_text().splitlines()
    lines[4] = json.dumps({"query_id": 4, "feature": [[0.1, 0.2, 0.3]] * 3})
    data["prompt"].write_text("\n".join(lines) + "\n")
    assert_fails(
        EGR.main, egr_args(data), "prompt.jsonl:5", "[3, 3]", "[2, 3]", out_dir=data["out"]
    )


def test_dimension_differs_between_files(data, tmp_path):
    txt = write_lines(
        tmp_path / "txt4.jsonl", [{"query_id": q, "feature": [0.5] * 4} for q in range(8)]
    )
    assert_fails(
        EGR.main,
        egr_args(data, **{"text-feats": txt}),
        "txt4.jsonl",
        "dimension 4",
        out_dir=data["out"],
    )


@pytest.mark.parametrize("bad", ["null", "NaN", "1e999"])
def test_non_finite_values_in_jsonl(data, bad):
    lines = data["mask"].read_text().splitlines()
    lines[6] = '{"query_id": 6, "feature": [[0.1, %s, 0.3], [0.1, 0.2, 0.3]]}' % bad
    data["mask"].write_text("\n".join(lines) + "\n")
    assert_fails(EGR.main, egr_args(data), "mask.jsonl:7", out_dir=data["out"])


def test_non_finite_values_in_binary_features(data, tmp_path):
    CONV.main([str(data["img"]), str(tmp_path / "img.npy")])
    arr = np.load(tmp_path / "img.npy")
    arr[2, 1] = np.inf
    np.save(tmp_path / "img.npy", arr)
    assert_fails(
        EGR.main,
        egr_args(data, **{"image-feats": tmp_path / "img.npy"}),
        "img.npy",
        "row 2",
        "'2'",
        out_dir=data["out"],
    )


def test_binary_features_without_or_with_a_wrong_ids_file(data, tmp_path):
    CONV.main([str(data["img"]), str(tmp_path / "img.npy")])
    side = tmp_path / "img.ids.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps(dict(meta, ids=meta["ids"][:3])))
    assert_fails(
        EGR.main,
        egr_args(data, **{"image-feats": tmp_path / "img.npy"}),
        "img.ids.json",
        "3 ids for 4",
    )
    side.write_text(json.dumps(dict(meta, key="query_id")))
    assert_fails(
        EGR.main,
        egr_args(data, **{"image-feats": tmp_path / "img.npy"}),
        "img.ids.json",
        "'image_id'",
    )
    side.unlink()
    assert_fails(
        EGR.main,
        egr_args(data, **{"image-feats": tmp_path / "img.npy"}),
        "img.ids.json",
        "not found",
        out_dir=data["out"],
    )


def test_empty_and_missing_files(data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_fails(
        EGR.main,
        egr_args(data, **{"prompt-feats": empty}),
        "empty.jsonl",
        "empty",
        out_dir=data["out"],
    )
    assert_fails(
        EGR.main,
        egr_args(data, **{"mask-feats": tmp_path / "nope.jsonl"}),
        "nope.jsonl",
        "not found",
        out_dir=data["out"],
    )


def test_duplicate_ids(data):
    with data["img"].open("a") as f:
        f.write(
            json.dumps({"image_id": 2, "feature": [0.1, 0.2, 0.3]}) + "\n"
        )  # 2 == "2" by string form
    assert_fails(EGR.main, egr_args(data), "img.jsonl", "duplicate image_id 2", out_dir=data["out"])


def test_slot_file_missing_a_query(data):
    lines = data["prompt"].read_text().splitlines()
    data["prompt"].write_text("\n".join(lines[:5] + lines[6:]) + "\n")
    assert_fails(EGR.main, egr_args(data), "prompt.jsonl", "query 5", out_dir=data["out"])


def test_real_slots_only_needs_recorded_counts(data):
    assert_fails(
        EGR.main,
        egr_args(data) + ["--real-slots-only"],
        "prompt.jsonl",
        "n_real_slots",
        out_dir=data["out"],
    )


def test_bad_flag_values(data):
    assert_fails(EGR.main, egr_args(data) + ["--top-k=0"], "--top-k", out_dir=data["out"])
    assert_fails(
        EGR.main, egr_args(data) + ["--device=nonsense"], "device 'nonsense'", out_dir=data["out"]
    )


def tbr_args(d, img_pred, txt_pred):
    return [
        str(d["img_gt"]),
        str(img_pred),
        str(d["txt_gt"]),
        str(txt_pred),
        str(d["out"] / "i.jsonl"),
        str(d["out"] / "t.jsonl"),
    ]


def test_tbr_query_without_prediction_and_unknown_predicted_id(data, tmp_path):
    img_pred = write_lines(
        tmp_path / "ip.jsonl", [{"image_id": str(i), "item_ids": [2 * i, 0]} for i in range(4)]
    )
    txt_pred = write_lines(
        tmp_path / "tp.jsonl", [{"query_id": q, "item_ids": [str(q // 2), "0"]} for q in range(7)]
    )
    assert_fails(
        TBR.main,
        tbr_args(data, img_pred, txt_pred),
        "tp.jsonl",
        "no prediction for query_id 7",
        "txt_gt.jsonl:8",
        out_dir=data["out"],
    )
    txt_pred = write_lines(
        tmp_path / "tp.jsonl", [{"query_id": q, "item_ids": [str(q // 2), "9"]} for q in range(8)]
    )
    assert_fails(
        TBR.main,
        tbr_args(data, img_pred, txt_pred),
        "tp.jsonl:1",
        "'9'",
        "ip.jsonl",
        out_dir=data["out"],
    )


def test_evaluation_failure_writes_the_failure_record(data, tmp_path):
    pred = write_lines(
        tmp_path / "p.jsonl", [{"query_id": q, "item_ids": ["0"]} for q in range(1, 8)]
    )
    out = tmp_path / "score.json"
    assert_fails(
        EVAL.main,
        [str(data["txt_gt"]), str(pred), str(out), "query_id"],
        "no prediction for query_id 0",
    )
    rec = json.loads(out.read_text())
    assert rec["success"] is False and rec["score"] == 0 and rec["scoreJson"] == {}
    assert "query_id 0" in rec["errorMsg"] and "p.jsonl" in rec["errorDetail"]


def run(script, *args):
    return subprocess.run(
        [sys.executable, "-u", str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def test_cli_exit_status_and_message_without_traceback(data, tmp_path):
    pred = write_lines(
        tmp_path / "p.jsonl",
        ['{"query_id": 0, "item_ids": ["0"]}', '{"query_id": 1, "item_ids": ['],
    )
    out = tmp_path / "score.json"
    r = run("eval/evaluation.py", data["txt_gt"], pred, out, "query_id")
    assert r.returncode != 0
    assert (
        r.stderr.startswith("error: ") and "p.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    )
    assert json.loads(out.read_text())["success"] is False

    lines = data["img"].read_text().splitlines()
    data["img"].write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]) + "\n")
    r = run("eval/make_topk_predictions_mask+prompt.py", *egr_args(data))
    assert r.returncode != 0
    assert (
        r.stderr.startswith("error: ") and "img.jsonl:2" in r.stderr and "Traceback" not in r.stderr
    )
    assert not data["out"].exists() or list(data["out"].iterdir()) == []
