"""scripts/gpu_check.py on a machine without a GPU: it runs nothing and says so; its check list covers every
CUDA path; a failing check does not stop the others and sets the exit status; a dry run on the CPU runs
the real checks at toy sizes and writes the table as JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from agree.ownership import MARKER
from experiments.gpu_check import (
    CPU_SIZES,
    FAIL,
    GPU_SIZES,
    OK,
    SKIP,
    Check,
    Context,
    checks,
    passed,
    read_results,
    run_checks,
    select,
    table,
    write_results,
)

ROOT = Path(__file__).resolve().parents[1]


def _script(*args: str, cuda_visible: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    return subprocess.run(
        [sys.executable, "scripts/gpu_check.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_without_a_gpu_nothing_runs_and_the_exit_status_is_0(tmp_path):
    proc = _script(
        "--out", str(tmp_path / "g.json"), "--work", str(tmp_path / "w"), cuda_visible=""
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device, so nothing was run and nothing was written" in proc.stdout
    assert not (tmp_path / "g.json").exists() and not (tmp_path / "w").exists()


def test_the_check_list_covers_every_cuda_path():
    names = [c.name for c in checks(GPU_SIZES)]
    assert len(names) == len(set(names))
    for p in ("fp32", "amp", "fp16", "bf16", "amp_bf16"):
        assert f"extraction {p}" in names
    for model in ("ViT-B-32", "ViT-L-14"):
        for lever in (
            "plain",
            "grad-checkpointing",
            "accum-freq 4",
            "amp",
            "amp_bf16",
            "bf16",
            "fp16",
            "lock-image",
            "lock-text",
        ):
            assert f"AGREE step {model} {lever}" in names
    for name in (
        "demo world + backbone",
        "process group, one process (NCCL; gloo on the CPU)",
        "fused AdamW",
        "top-k, torch backend vs numpy",
        "--torchcompile step",
    ):
        assert name in names
    assert names[0] == "demo world + backbone"  # the extraction checks read what it leaves
    cpu_only_skipped = {c.name for c in checks(CPU_SIZES) if c.cuda_only}
    assert "extraction amp" in cpu_only_skipped and "fused AdamW" in cpu_only_skipped
    assert [c.name for c in select(checks(GPU_SIZES), ["extraction f"])] == [
        "extraction fp32",
        "extraction fp16",
    ]


def test_every_check_runs_whatever_the_others_do_and_the_record_says_so(tmp_path):
    def boom(ctx):
        raise RuntimeError("the device fell off")

    ran = []

    def fine(ctx):
        ran.append(ctx.device.type)
        return "42 things", {"n": 42}

    ctx = Context(torch.device("cpu"), CPU_SIZES, tmp_path / "cache", tmp_path / "work")
    results = run_checks(
        [Check("first", boom), Check("second", fine), Check("third", fine, "needs CUDA")], ctx
    )
    assert [r.status for r in results] == [FAIL, OK, SKIP] and ran == ["cpu"]
    assert results[0].key == "RuntimeError: the device fell off"
    assert "Traceback" in results[0].error and results[1].details == {"n": 42}
    assert results[2].key == "needs CUDA" and not passed(results)
    assert passed(results[1:])
    lines = table(results).splitlines()
    assert lines[0] == "| check | status | seconds | key number |"
    assert lines[3].startswith("| second | ok | ") and lines[3].endswith(" | 42 things |")
    write_results(tmp_path / "g.json", results, torch.device("cpu"), ["scripts/gpu_check.py"])
    record = read_results(tmp_path / "g.json")
    assert record["passed"] is False and record["time_goal_seconds"] == 480
    assert [c["check"] for c in record["checks"]] == ["first", "second", "third"]
    assert set(record["checks"][1]) == {"check", "status", "seconds", "key", "details", "error"}
    assert record["device"].startswith("CPU (dry run at toy sizes); torch ")


def test_dry_run_on_the_cpu_runs_the_real_checks_and_writes_the_table(tmp_path):
    """World, backbone pre-training and extraction at two precisions, an AGREE step, the process group
    (gloo), the top-k backends; fused AdamW is skipped with its reason."""
    out, work = tmp_path / "g.json", tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("kept")
    proc = _script(
        "--device",
        "cpu",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--work",
        str(work),
        "--only",
        "demo world",
        "extraction fp32",
        "extraction bf16",
        "AGREE step tiny accum",
        "process group",
        "fused",
        "top-k",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    status = {c["check"]: c["status"] for c in record["checks"]}
    assert status == {
        "demo world + backbone": "ok",
        "extraction fp32": "ok",
        "extraction bf16": "ok",
        "AGREE step tiny accum-freq 4": "ok",
        "process group, one process (NCCL; gloo on the CPU)": "ok",
        "fused AdamW": "skip",
        "top-k, torch backend vs numpy": "ok",
    }
    by = {c["check"]: c for c in record["checks"]}
    fp32 = by["extraction fp32"]["details"]["recall"]
    assert 0 <= fp32["t2i_r1"] <= fp32["t2i_r10"] <= 100
    bf16 = by["extraction bf16"]["details"]
    assert 0 < bf16["max_abs_feature_diff_vs_fp32"] < 0.05  # bfloat16 rounding, not another model
    assert "vs fp32" in by["extraction bf16"]["key"]
    assert "extraction precision: bf16 on cpu" in proc.stdout
    assert by["AGREE step tiny accum-freq 4"]["details"]["flags"] == ["--accum-freq", "4"]
    assert "| top-k, torch backend vs numpy | ok |" in proc.stdout
    assert record["passed"] is True
    # the scratch files are gone, the user's file is not
    assert sorted(p.name for p in work.iterdir()) == [MARKER, "mine.txt"]


def test_a_failed_check_sets_the_exit_status_and_the_others_still_run(tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache should be")
    out = tmp_path / "g.json"
    proc = _script(
        "--device",
        "cpu",
        "--out",
        str(out),
        "--cache",
        str(not_a_folder),
        "--work",
        str(tmp_path / "work"),
        "--only",
        "demo world",
        "extraction fp32",
        "top-k",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [c["status"] for c in record["checks"]] == ["fail", "fail", "ok"]
    assert "needs the world and backbone" in record["checks"][1]["key"]
    assert record["passed"] is False
