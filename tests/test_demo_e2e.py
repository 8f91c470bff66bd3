"""The README's main job, scripts/run_demo.sh, end to end at toy sizes: the record's schema, determinism,
the cache, the presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agree.metrics import ROW_KEYS
from experiments.demo import PRESETS, methods
from training.terms import AGREE_TERMS, BY_NAME

ROOT = Path(__file__).resolve().parents[1]
TOY = dict(
    TRAIN_IMAGES="24",
    TRAIN_CAPTIONS="2",
    VAL_IMAGES="8",
    TEST_IMAGES="12",
    TWIN_PAIRS="3",
    VG_PER_OBJECT="2",
    PRETRAIN_IMAGES="48",
    PRETRAIN_EPOCHS="1",
    PRETRAIN_BATCH="16",
    EPOCHS="1",
    BATCH_SIZE="8",
    WARMUP="2",
    PRETRAIN_WARMUP="2",
)
KINDS = {"binding", "size", "mirror", "recolour", "all"}


def _run(out: Path, cache: Path, **env) -> str:
    full = dict(
        os.environ,
        PYTHON=sys.executable,
        DEMO_DIR=str(out),
        CACHE_DIR=str(cache),
        TQDM_DISABLE="1",
        **TOY,
        **env,
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/run_demo.sh")],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    first = _run(base / "a", base / "cache", SEEDS="0,1")
    second = _run(base / "b", base / "cache", SEEDS="0,1")
    return base, first, second


def test_record_has_every_row_once_with_seeds_mean_sd_and_twins(two_runs):
    base, stdout, _ = two_runs
    record = json.loads((base / "a/results.json").read_text())
    rows = record["rows"]
    assert [(r["section"], r["method"]) for r in rows] == [
        ("zero-shot", "CLIP"),
        ("zero-shot", "CLIP+TBR"),
        ("zero-shot", "CLIP+EGR"),
        ("zero-shot", "CLIP+EGR+TBR"),
        ("fine-tuned", "global-only"),
        ("fine-tuned", "AGREE"),
        ("fine-tuned", "AGREE+TBR"),
    ]
    for r in rows:
        assert set(r["mean"]) == set(r["sd"]) == set(ROW_KEYS)
        for e in r["per_seed"]:
            assert 0 <= e["t2i_r1"] <= e["t2i_r5"] <= e["t2i_r10"] <= 100
            assert e["rsum"] == pytest.approx(sum(e[k] for k in ROW_KEYS[:-1]))
    tuned = rows[4]
    assert [e["seed"] for e in tuned["per_seed"]] == [0, 1]
    assert tuned["mean"]["rsum"] == pytest.approx(sum(e["rsum"] for e in tuned["per_seed"]) / 2)
    for r in (rows[0], rows[4], rows[5]):
        assert set(r["twin"]) == KINDS and r["twin"]["all"]["n"] == 12
        assert (
            0
            <= r["twin"]["all"]["group"]
            <= min(r["twin"]["all"]["text"], r["twin"]["all"]["image"])
        )
    assert record["paired"]["n"] == 2 and "noise" in record["paired"]["sentence"]
    assert set(record["seconds"]) >= {
        "world",
        "backbone",
        "zero-shot",
        "global-only seed 0",
        "AGREE seed 1",
    }
    for name in ("rsum.png", "retrieval_examples.png"):
        assert (base / "a" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expected total" in stdout and "| AGREE+TBR |" in stdout


def test_same_seeds_give_the_same_record_and_the_cache_is_reused(two_runs):
    base, _, second = two_runs
    a = json.loads((base / "a/results.json").read_text())
    b = json.loads((base / "b/results.json").read_text())
    a.pop("seconds"), b.pop("seconds")  # wall-clock times are the only difference
    assert a == b
    assert len(list((base / "cache/backbones").glob("*.pt"))) == 1
    assert "expected ~0 s" in second  # world and backbone come from the cache


def test_presets_quick_is_one_seed_and_full_adds_each_ablation_once():
    assert PRESETS["quick"].seeds == (0,) and len(PRESETS["default"].seeds) >= 3
    labels = [label for label, _ in methods(PRESETS["full"])]
    assert labels == [
        "global-only",
        "AGREE",
        "AGREE w/o prompt",
        "AGREE w/o text mask",
        "AGREE w/o VG contrastive",
        "AGREE w/o VG mask",
        "AGREE w/o grounding mask",
    ]
    assert [label for label, _ in methods(PRESETS["default"])] == ["global-only", "AGREE"]
    for label, terms in methods(PRESETS["full"])[2:]:
        assert len(terms) == 4 and label.endswith(
            BY_NAME[(set(AGREE_TERMS) - set(terms)).pop()].label
        )
