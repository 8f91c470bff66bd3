"""The README's main job, scripts/run_demo.sh, end to end at toy sizes (one epoch each)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, PYTHON=sys.executable, DEMO_DIR=str(out / "demo"), PRETRAINED=str(out / "tiny.pt"),
               TRAIN_IMAGES="16", VAL_IMAGES="5", TEST_IMAGES="10", PRETRAIN_IMAGES="32", PRETRAIN_EPOCHS="1",
               FINETUNE_EPOCHS="1", TRAIN_CAPTIONS="2", VG_PER_OBJECT="2", FINETUNE_BATCH="8", PRETRAIN_BATCH="16")
    proc = subprocess.run(["bash", str(ROOT / "scripts/run_demo.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "demo", proc.stdout


def test_demo_writes_every_table_row(demo):
    folder, stdout = demo
    rows = json.loads((folder / "results/results.json").read_text())["rows"]
    methods = [r["method"] for r in rows]
    assert methods[:4] == ["CLIP zero-shot", "+ TBR", "+ EGR", "+ EGR + TBR"]
    assert "CLIP (global loss only)" in methods and "AGREE (all terms) + TBR" in methods
    assert sum(m.startswith("AGREE w/o") for m in methods) == 5
    for r in rows:
        for direction in ("t2i", "i2t"):
            s = r[direction]
            assert 0 <= s["r1"] <= s["r5"] <= s["r10"] <= 100
            assert s["mean_recall"] == pytest.approx((s["r1"] + s["r5"] + s["r10"]) / 3, abs=0.01)
        assert r["rsum"] == pytest.approx(sum(r[d][k] for d in ("t2i", "i2t") for k in ("r1", "r5", "r10")), abs=0.05)
    table = (folder / "results.md").read_text()
    assert "| + EGR + TBR |" in table and "| AGREE w/o grounding mask |" in table
    assert "| + EGR + TBR |" in stdout  # the demo ends by printing the table


def test_demo_uses_the_pretrained_tiny_model_and_draws_examples(demo):
    folder, _ = demo
    assert (folder.parent / "tiny.pt").is_file()
    png = folder / "retrieval_examples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the fine-tuned runs started from the exported pre-trained weights, with the README's flags
    params = (folder / "results/runs/agree_all_terms/params.txt").read_text()
    assert "openai_pretrained: True" in params and "is_vg: True" in params
    assert str(folder.parent / "tiny.pt") in params


def test_zero_shot_rows_come_from_the_egr_and_tbr_outputs(demo):
    folder, _ = demo
    preds = folder / "results/predictions/zeroshot"
    for name in ("test_texts_predictions_mask+prompt.jsonl", "test_images_predictions_mask+prompt_rerank.jsonl"):
        assert (preds / name).stat().st_size > 0
    first = json.loads((preds / "test_texts_predictions_mask+prompt.jsonl").read_text().splitlines()[0])
    assert isinstance(first["item_ids"][0], list) and len(first["item_ids"][0]) == 4  # [id, s, a, b]
