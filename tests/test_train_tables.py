"""scripts/reproduce_tables.py's pieces: the epoch it evaluates, the global batch on any process count, the
flags it passes to every fine-tuning run, the stage records (skip, redo, resume, ownership), the results'
setup, the paired interval and the published references. The end-to-end runs: tests/test_tables_e2e.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _scripts import load_script

from agree.io import InputError, read_json
from agree.layout import Layout
from agree.metrics import ABSENT, RECALL_KEYS, row_from_ranks
from agree.ownership import OutputFolder
from experiments.references import REFERENCES, difference, references_for
from experiments.stages import Stage, StageRunner
from experiments.stats import bootstrap_rsum_se, paired_bootstrap_rsum
from experiments.tables import (
    OWNER,
    TableRunner,
    batch_split,
    evaluated_epoch,
    fine_tune_flags,
    open_output_folder,
)
from training.params import parse_args as train_args

tables = load_script("scripts/reproduce_tables.py")


def test_evaluated_epoch_is_the_recipes_second_when_it_exists_else_the_last():
    assert evaluated_epoch(50, None) == 2 and evaluated_epoch(2, None) == 2
    assert evaluated_epoch(1, None) == 1
    assert evaluated_epoch(50, 50) == 50 and evaluated_epoch(3, 1) == 1
    for bad in (0, 4):
        with pytest.raises(InputError, match="--epoch must be between 1 and --epochs"):
            evaluated_epoch(3, bad)


@pytest.mark.parametrize(
    "processes,expected",
    [(1, (8, 4)), (2, (8, 2)), (4, (8, 1)), (8, (4, 1)), (16, (2, 1)), (32, (1, 1))],
)
def test_the_releases_global_batch_on_any_number_of_processes(processes, expected):
    batch, accum = batch_split(32, processes, 8)
    assert (batch, accum) == expected and processes * batch * accum == 32


def test_a_global_batch_that_cannot_be_shared_is_an_error():
    for processes in (3, 5, 64):
        with pytest.raises(InputError, match=f"cannot be reached with {processes} fine-tuning"):
            batch_split(32, processes, 8)
    assert batch_split(48, 1, 8) == (8, 6) and batch_split(36, 1, 8) == (6, 6)
    with pytest.raises(InputError, match="cannot be reached with 3"):
        tables.parse_args(["--nproc", "3", "--device", "cpu"])


def test_flags_passed_to_every_fine_tuning_run():
    args = tables.parse_args(["--device", "cpu"])
    assert (args.epochs, args.epoch, args.ranking, args.global_batch) == (50, 2, "release", 32)
    # one CPU process: 8 per micro-batch, 4 accumulated; the release's ranking arithmetic; resumable
    assert fine_tune_flags(args) == [
        "--save-frequency=2",
        "--stop-after-epoch=2",
        "--batch-size=8",
        "--accum-freq=4",
        "--legacy-detached-rank",
        "--save-every-n-steps=1000",
        "--resume=latest",
    ]
    args = tables.parse_args(
        [
            *("--epochs", "3", "--epoch", "3", "--nproc", "2", "--device", "cpu"),
            *("--ranking", "described", "--global-batch", "12", "--batch-size", "4"),
            *("--save-every-n-steps", "0", "--max-missing-fraction", "0.01", "--precision", "fp32"),
        ]
    )
    flags = fine_tune_flags(args)
    assert flags == [
        "--save-frequency=3",
        "--stop-after-epoch=3",
        "--batch-size=3",
        "--accum-freq=2",
        "--nproc=2",
        "--max-missing-fraction=0.01",
        "--precision=fp32",
        "--resume=latest",
    ]
    parsed = train_args(["--train-data", "x.jsonl", "--epochs", "3", "--name", "r", *flags])
    assert (
        parsed.stop_after_epoch,
        parsed.nproc,
        parsed.batch_size * parsed.accum_freq * parsed.nproc,
        parsed.legacy_detached_rank,
        parsed.max_missing_fraction,
        parsed.resume,
    ) == (3, 2, 12, False, 0.01, "latest")
    assert tables.parse_args(["--legacy-detached-rank"]).ranking == "release"
    with pytest.raises(InputError, match="--legacy-detached-rank is --ranking release"):
        tables.parse_args(["--legacy-detached-rank", "--ranking", "described"])


def _runner(tmp_path, *extra):
    lay = Layout.under(tmp_path)
    for path in lay.test_files():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (tmp_path / "model.pt").write_bytes(b"")
    args = tables.parse_args(
        [
            *("--data-root", str(lay.data_dir), "--pretrained", str(tmp_path / "model.pt")),
            *("--out", str(tmp_path / "out"), "--epochs", "5", "--device", "cpu", *extra),
        ]
    )
    return TableRunner(args)


def test_results_state_the_setup(tmp_path):
    runner = _runner(tmp_path, "--global-batch", "16", "--nproc", "2")
    runner.write_results()
    setup = json.loads((tmp_path / "out" / "results.json").read_text())["setup"]
    assert (setup["epoch"], setup["epochs"], setup["ranking"], setup["global_batch"]) == (
        2,
        5,
        "release",
        16,
    )
    assert (setup["processes"], setup["batch_size"], setup["accum_freq"]) == (2, 8, 1)
    header = (tmp_path / "out" / "results.md").read_text().splitlines()[2]
    assert "checkpoint `epoch_2.pt` (epoch 2 of a 5-epoch schedule)" in header
    assert "the release's arithmetic (--legacy-detached-rank" in header
    assert "global batch 16 (2 processes x batch 8)" in header
    assert OutputFolder(tmp_path / "out", OWNER).owns("results.json")


@pytest.mark.parametrize("captions", [[["q0", "q1"], ["q2"]], [["q0", "q1", "q2"], []]])
def test_a_test_split_with_uneven_captions_is_refused_before_any_stage_runs(tmp_path, captions):
    runner = _runner(tmp_path, "--parts", "zeroshot")
    lay = runner.lay
    lay.test_texts.write_text(
        "".join(json.dumps({"query_id": f"q{i}", "item_ids": [0]}) + "\n" for i in range(3))
    )
    lay.test_images.write_text(
        "".join(
            json.dumps({"image_id": i, "item_ids": caps}) + "\n" for i, caps in enumerate(captions)
        )
    )
    with pytest.raises(InputError, match="test_images.jsonl: images have .* captions"):
        runner.run_parts(["zeroshot"])
    assert not (tmp_path / "out" / "manifests").exists() and runner.stages.total == 0


# --------------------------------------------------------------------------- stages
COPY = """import sys, pathlib, time
time.sleep(0.1)  # a stage that takes measurable time (for the ETA)
src, dst, counter = sys.argv[1:4]
with open(counter, "a") as f:
    f.write(dst + "\\n")
if pathlib.Path(dst).exists():
    pathlib.Path(dst + ".continued").write_text("found the partial output")
pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
pathlib.Path(dst).write_text(pathlib.Path(src).read_text().upper())
fail = pathlib.Path(counter).with_name("fail_once")
if fail.exists():  # killed after writing its output: the run ends without finishing
    fail.unlink()
    sys.exit(3)
"""


def _stage(repo, out, name, src, dst, *extra, resumable=False):
    return Stage(
        name,
        "copy",
        "copy.py",
        [str(src), str(dst), str(repo / "calls.txt"), *extra],
        inputs=[Path(src)],
        outputs=[Path(dst)],
        resumable=resumable,
    )


def _calls(repo):
    path = repo / "calls.txt"
    return path.read_text().splitlines() if path.is_file() else []


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "copy.py").write_text(COPY)
    (tmp_path / "a.txt").write_text("abc")
    return tmp_path


def test_a_finished_stage_is_skipped_and_a_changed_one_redone_with_what_follows(repo, capsys):
    out = repo / "out"
    runner = StageRunner(OutputFolder(out, OWNER), repo, sys.executable)
    first = _stage(repo, out, "first", repo / "a.txt", out / "b.txt")
    second = _stage(repo, out, "second", out / "b.txt", out / "c.txt")
    assert [runner.run(first), runner.run(second)] == ["new", "new"]
    assert (out / "c.txt").read_text() == "ABC" and len(_calls(repo)) == 2
    stamp = (out / "c.txt").stat().st_mtime_ns
    manifest = read_json(out / "manifests" / "second.json")
    assert manifest["status"] == "done" and str(out / "b.txt") in manifest["inputs"]
    assert manifest["outputs"] == {
        str(out / "c.txt"): {"size": 3, "mtime_ns": stamp}
    }  # what it wrote, fingerprinted

    again = StageRunner(OutputFolder(out, OWNER), repo, sys.executable)
    assert [again.run(first), again.run(second)] == ["done", "done"]
    assert len(_calls(repo)) == 2 and (out / "c.txt").stat().st_mtime_ns == stamp
    assert "second: done earlier, skipped" in capsys.readouterr().out

    (repo / "a.txt").write_text("abcd")  # a changed input: the stage and the next one run again
    assert [again.run(first), again.run(second)] == ["new", "new"]
    assert (out / "c.txt").read_text() == "ABCD" and len(_calls(repo)) == 4

    (out / "c.txt").write_text("tampered")  # a damaged output: done again
    assert again.run(second) == "new" and (out / "c.txt").read_text() == "ABCD"
    changed = _stage(repo, out, "second", out / "b.txt", out / "c.txt", "--flag")
    assert again.run(changed) == "new"  # another command: done again


@pytest.mark.parametrize("resumable", [True, False])
def test_a_killed_stage_is_resumed_if_resumable_else_redone(repo, resumable):
    out = repo / "out"
    runner = StageRunner(OutputFolder(out, OWNER), repo, sys.executable)
    stage = _stage(repo, out, "s", repo / "a.txt", out / "b.txt", resumable=resumable)
    (repo / "fail_once").write_text("")
    with pytest.raises(InputError, match="stage 's' failed \\(exit 3\\)"):
        runner.run(stage)
    assert read_json(out / "manifests" / "s.json")["status"] == "running"
    assert (out / "b.txt").is_file()  # its partial output
    assert runner.run(stage) == ("resume" if resumable else "new")
    # resumed: run again over its partial output; else that output was deleted first
    assert (out / "b.txt.continued").is_file() == resumable
    assert read_json(out / "manifests" / "s.json")["status"] == "done"


def test_the_runner_never_replaces_or_deletes_a_file_it_did_not_write(repo, capsys):
    out = repo / "out"
    out.mkdir()
    (out / "b.txt").write_text("mine")
    with pytest.raises(InputError, match="holds files that scripts/reproduce_tables.py did not"):
        open_output_folder(out, overwrite=False)
    (out / "b.txt").unlink()
    folder = open_output_folder(out, overwrite=False)
    runner = StageRunner(folder, repo, sys.executable)
    runner.run(_stage(repo, out, "first", repo / "a.txt", out / "x" / "b.txt"))
    (out / "notes.txt").write_text("the user's")
    (out / "x" / "c.txt").write_text("the user's too")
    with pytest.raises(InputError, match="was not written by scripts/reproduce_tables.py"):
        runner.run(_stage(repo, out, "second", repo / "a.txt", out / "x" / "c.txt"))
    open_output_folder(out, overwrite=True)  # --overwrite: what the runner wrote goes, nothing else
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        ".agree-owner.json",
        "notes.txt",
        "x/c.txt",
    ]
    assert "kept 2 file(s) that it did not write" in capsys.readouterr().out


def test_the_eta_counts_the_remaining_stages_by_kind(repo):
    out = repo / "out"
    runner = StageRunner(OutputFolder(out, OWNER), repo, sys.executable)
    stages = [_stage(repo, out, f"s{i}", repo / "a.txt", out / f"{i}.txt") for i in range(3)]
    for s in stages:
        runner.plan(s)
    assert runner.total == 3 and list(runner.remaining) == ["s0", "s1", "s2"]
    assert runner.eta() == (0.0, ["copy"])
    runner.run(stages[0])
    seconds = runner.seconds["copy"][0]
    assert runner.eta() == (pytest.approx(2 * seconds), [])
    # planned again: the finished stage adds nothing; its recorded time stands for the others
    fresh = StageRunner(OutputFolder(out, OWNER), repo, sys.executable)
    for s in stages:
        fresh.plan(s)
    assert list(fresh.remaining) == ["s1", "s2"] and fresh.eta() == (pytest.approx(2 * seconds), [])


# --------------------------------------------------------------------------- uncertainty, references
def _ranks(rng, n, caps, p):
    """First-gold ranks with hit rate about p: rank 0 (hit) or ABSENT."""
    t2i = np.where(rng.random(n * caps) < p, 0, ABSENT)
    i2t = np.where(rng.random(n) < p, 0, ABSENT)
    return t2i, i2t


def test_paired_interval_uses_the_same_resamples_for_both_models():
    rng = np.random.default_rng(0)
    a = _ranks(rng, 200, 5, 0.5)
    b = (a[0].copy(), a[1].copy())
    b[0][:100] = ABSENT  # b misses the first 20 images' captions that a finds
    stats = paired_bootstrap_rsum(a, b, 5)
    want = row_from_ranks(*a)["rsum"] - row_from_ranks(*b)["rsum"]
    assert stats["diff"] == pytest.approx(want)
    assert stats["low"] <= want <= stats["high"] and stats["low"] > 0
    # paired: far narrower than the two models' own sampling errors combined
    alone = np.hypot(bootstrap_rsum_se(*a, 5), bootstrap_rsum_se(*b, 5))
    assert stats["se"] < alone / 3
    same = paired_bootstrap_rsum(a, a, 5)
    assert (same["diff"], same["low"], same["high"], same["se"]) == (0.0, 0.0, 0.0, 0.0)


def test_references_name_their_source_and_give_the_difference():
    ref = references_for("flickr30k", "ViT-L/14", "CLIP")
    assert len(ref) == 1 and "open_clip" in ref[0].url and set(ref[0].values) == set(RECALL_KEYS)
    assert references_for("flickr30k", "tiny", "CLIP") == []
    row = {k: 50.0 for k in RECALL_KEYS} | {"rsum": 300.0}
    diff = difference(row, ref[0])
    assert diff["t2i_r1"] == round(50.0 - ref[0].values["t2i_r1"], 2)
    assert diff["rsum"] == round(300.0 - sum(ref[0].values.values()), 2)
    partial = references_for("flickr30k", "ViT-L-14", "AGREE+TBR")[0]
    assert "rsum" not in difference(row, partial) and set(partial.values) == {
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
    }
    for r in REFERENCES:
        assert (
            r.url.startswith("https://")
            and r.source
            and all(0 < v <= 100 for v in r.values.values())
        )
