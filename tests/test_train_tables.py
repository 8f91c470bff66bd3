"""scripts/reproduce_tables.py: the epoch it evaluates, and the flags it passes to every fine-tuning run."""

import json

import pytest
from _scripts import load_script

from agree.io import InputError
from agree.layout import Layout
from experiments.tables import TableRunner, evaluated_epoch, fine_tune_flags
from training.params import parse_args as train_args

tables = load_script("scripts/reproduce_tables.py")


def test_evaluated_epoch_is_the_recipes_second_when_it_exists_else_the_last():
    assert evaluated_epoch(50, None) == 2 and evaluated_epoch(2, None) == 2
    assert evaluated_epoch(1, None) == 1
    assert evaluated_epoch(50, 50) == 50 and evaluated_epoch(3, 1) == 1
    for bad in (0, 4):
        with pytest.raises(InputError, match="--epoch must be between 1 and --epochs"):
            evaluated_epoch(3, bad)


def test_flags_passed_to_every_fine_tuning_run():
    args = tables.parse_args([])
    assert (args.epochs, args.epoch, args.nproc, args.legacy_detached_rank) == (50, 2, None, False)
    # stop after the evaluated epoch (same schedule), one worker per visible GPU unless --nproc is given
    assert fine_tune_flags(args) == ["--save-frequency=2", "--stop-after-epoch=2"]
    args = tables.parse_args(
        [
            "--epochs",
            "3",
            "--epoch",
            "3",
            "--nproc",
            "2",
            "--legacy-detached-rank",
            "--max-missing-fraction",
            "0.01",
            "--precision",
            "fp32",
        ]
    )
    flags = fine_tune_flags(args)
    assert flags == [
        "--save-frequency=3",
        "--stop-after-epoch=3",
        "--nproc=2",
        "--legacy-detached-rank",
        "--max-missing-fraction=0.01",
        "--precision=fp32",
    ]
    parsed = train_args(
        ["--train-data", "x.jsonl", "--epochs", "3", *flags]
    )  # main_all.py accepts them
    assert (
        parsed.stop_after_epoch,
        parsed.nproc,
        parsed.legacy_detached_rank,
        parsed.max_missing_fraction,
    ) == (3, 2, True, 0.01)


def test_results_name_the_evaluated_epoch(tmp_path):
    lay = Layout.under(tmp_path)
    for path in lay.test_files():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (tmp_path / "model.pt").write_bytes(b"")
    args = tables.parse_args(
        [
            "--data-root",
            str(lay.data_dir),
            "--pretrained",
            str(tmp_path / "model.pt"),
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "5",
            "--legacy-detached-rank",
        ]
    )
    runner = TableRunner(args)
    runner.add_row(
        "Fine-tuning",
        "AGREE",
        {d: {"r1": 1.0, "r5": 2.0, "r10": 3.0, "mean_recall": 2.0} for d in ("t2i", "i2t")},
    )
    runner.write_results()
    setup = json.loads((tmp_path / "out" / "results.json").read_text())["setup"]
    assert (setup["epoch"], setup["epochs"], setup["legacy_detached_rank"]) == (2, 5, True)
    header = (tmp_path / "out" / "results.md").read_text().splitlines()[2]
    assert (
        "checkpoint `epoch_2.pt` (epoch 2 of a 5-epoch schedule) with `--legacy-detached-rank`"
        in header
    )
