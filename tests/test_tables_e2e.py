"""scripts/reproduce_tables.py end to end on the synthetic dataset with a tiny model on the CPU: the results'
contract, a second run that rewrites nothing, and a run killed (SIGKILL) during its second fine-tuning
stage that the same command finishes, with the rows of an uninterrupted run."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agree.metrics import ROW_KEYS
from clip.clip import create_model
from synth.writer import SynthConfig, SynthLayout, generate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_tables.py"
# 8 training captions, global batch 4 (batch 2 x 2 accumulated): 2 steps per epoch, 3 epochs
RECIPE = (
    *("--model", "tiny", "--device", "cpu", "--epochs", "3", "--epoch", "3"),
    *("--global-batch", "4", "--batch-size", "2", "--warmup", "1", "--lr", "1e-3"),
    *("--save-every-n-steps", "1", "--examples", "0", "--eval-batch-size", "16"),
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    generate(
        SynthConfig(
            out=root / "syn",
            train_images=8,
            val_images=2,
            test_images=6,
            pretrain_images=0,
            resolution=32,
            train_captions=1,
            vg_per_object=1,
        ),
        progress=False,
    )
    torch.manual_seed(0)
    torch.save(create_model("tiny").state_dict(), root / "tiny.pt")
    lay = SynthLayout.under(root / "syn")
    return root, ["--data-root", str(lay.data_dir), "--vg-root", str(lay.vg_dir)]


def _argv(data, out, parts):
    root, where = data
    return [
        *where,
        "--pretrained",
        str(root / "tiny.pt"),
        "--out",
        str(out),
        "--parts",
        parts,
        *RECIPE,
    ]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def _run(argv):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, env=_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _files(out: Path, *folders: str) -> dict[str, tuple]:
    """Every file under the folders: (size, mtime_ns, sha256)."""
    return {
        p.relative_to(out).as_posix(): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for f in folders
        for p in sorted((out / f).rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def full(data):
    """One uninterrupted run: zero-shot and fine-tuning tables."""
    out = data[0] / "full"
    stdout = _run(_argv(data, out, "zeroshot,finetune"))
    return out, stdout


def test_results_keep_the_layout_and_state_setup_and_errors(full):
    out, stdout = full
    assert "global batch 4 = 1 process x batch 2 x 2 accumulated micro-batches" in stdout
    for path in ("predictions/zeroshot", "predictions/agree", "runs/agree/checkpoints", "logs"):
        assert (out / path).is_dir(), path
    assert sorted(p.name for p in (out / "runs" / "agree" / "checkpoints").iterdir()) == [
        "epoch_3.pt"
    ]  # the evaluated epoch only: epoch_latest.pt served resuming and is gone
    record = json.loads((out / "results.json").read_text())
    assert record["setup"]["ranking"] == "release" and record["setup"]["global_batch"] == 4
    methods = [r["method"] for r in record["rows"]]
    assert methods == [
        "CLIP",
        "CLIP+TBR",
        "CLIP+EGR",
        "CLIP+EGR+TBR",
        "global-only",
        "global-only+TBR",
        "AGREE",
        "AGREE+TBR",
    ]
    for r in record["rows"]:
        assert set(ROW_KEYS) <= set(r) and isinstance(r["test_se"]["rsum"], float)
        assert r["test_se"]["rsum"] > 0
        assert r["rsum"] == pytest.approx(sum(r[k] for k in ROW_KEYS[:-1]), abs=0.02)
    assert [(p["a"], p["b"]) for p in record["paired"]] == [
        ("AGREE", "global-only"),
        ("AGREE+TBR", "global-only+TBR"),
    ]
    for p in record["paired"]:
        assert p["rsum"]["low"] <= p["rsum"]["diff"] <= p["rsum"]["high"]
    md = (out / "results.md").read_text()
    assert "| CLIP+EGR+TBR |" in md and "test SE" in md and "paired bootstrap" in md
    # the training log's ETA counts the steps up to --epoch, and the run used the release's ranking
    log = (out / "runs" / "agree" / "out.log").read_text()
    assert (
        "step 6 loss" in log
        and "legacy_detached_rank: True" in (out / "runs" / "agree" / "params.txt").read_text()
    )


def test_a_second_run_rewrites_nothing_and_takes_seconds(data, full):
    out, _ = full
    before = _files(out, "predictions", "runs")
    start = time.time()
    stdout = _run(_argv(data, out, "zeroshot,finetune"))
    seconds = time.time() - start
    assert _files(out, "predictions", "runs") == before
    assert ", 0 to run" in stdout
    assert not [line for line in stdout.splitlines() if line.endswith(" ...")]  # no stage started
    assert seconds < 30, seconds
    record = json.loads((out / "results.json").read_text())
    assert (
        len(record["rows"]) == 8 and "agree.train" in record["seconds"]
    )  # times from the manifests


def test_a_run_killed_in_its_second_fine_tuning_finishes_with_the_same_rows(data, full):
    out = data[0] / "killed"
    argv = _argv(data, out, "finetune")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
        cwd=ROOT,
        start_new_session=True,  # its stage processes are in its process group: kill them all
    )
    log = out / "runs" / "agree" / "out.log"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and "Train Epoch" in log.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "ended before it could be killed: " + proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifests = out / "manifests"
    assert json.loads((manifests / "global_only.tbr.eval_i2t.json").read_text())["status"] == "done"
    assert json.loads((manifests / "agree.train.json").read_text())["status"] == "running"
    first = _files(out, "predictions/global_only", "runs/global_only")

    stdout = _run(argv)
    for name in ("global_only.train", "global_only.extract", "global_only.tbr.eval_i2t"):
        assert f" {name}: done earlier, skipped" in stdout, name
    assert " agree.train: resumed, finished" in stdout
    assert _files(out, "predictions/global_only", "runs/global_only") == first
    assert "resumed from" in log.read_text() or "starting a new run" in log.read_text()

    # the rows and the fine-tuned weights are those of the uninterrupted run
    want = json.loads((full[0] / "results.json").read_text())["rows"][4:]
    got = json.loads((out / "results.json").read_text())["rows"]
    assert got == want
    a = torch.load(full[0] / "runs/agree/checkpoints/epoch_3.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "runs/agree/checkpoints/epoch_3.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
