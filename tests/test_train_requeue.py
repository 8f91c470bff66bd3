"""A run that a cluster can requeue: --resume latest starts a new run when there is no checkpoint yet,
--delete-previous-checkpoint keeps the epoch checkpoints from piling up, the default run name is one
folder and the same on every rank, and the progress log's ETA counts the steps up to --stop-after-epoch."""

import re
import socket

import pytest
import torch.multiprocessing as mp
from _train_data import make_dataset, one_torch_thread, train_argv  # noqa: F401 (autouse fixture)
from test_train_run import log_losses

from training import checkpoint as C
from training import train as train_module
from training.distributed import DistEnv
from training.engine import run
from training.params import parse_args


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("requeue"), n_images=2, caps_per_image=1, n_val=2)


def _argv(small, logs, name, *extra, epochs=2):
    return train_argv(small, logs, name, *extra, batch_size=2, epochs=epochs)


def test_resume_latest_without_a_checkpoint_is_a_new_run_then_resumes(small, tmp_path):
    plain = run(parse_args(_argv(small, tmp_path, "plain")), DistEnv(), keep_history=True)
    fresh = run(
        parse_args(_argv(small, tmp_path, "requeued", "--resume", "latest")),
        DistEnv(),
        keep_history=True,
    )
    log = (tmp_path / "requeued" / "out.log").read_text()
    assert "--resume latest: no checkpoint in" in log and "starting a new run" in log
    assert [s for s, _ in fresh.history] == [s for s, _ in plain.history] == [1, 2]
    assert log_losses(tmp_path / "requeued" / "out.log") == log_losses(
        tmp_path / "plain" / "out.log"
    )
    # the same command again (a requeue after the run finished): it resumes from the newest checkpoint
    again = run(
        parse_args(_argv(small, tmp_path, "requeued", "--resume", "latest")),
        DistEnv(),
        keep_history=True,
    )
    assert again.history == [] and again.final_step == 2
    assert "resumed from" in (tmp_path / "requeued" / "out.log").read_text()


@pytest.mark.parametrize("delete", [False, True])
def test_delete_previous_checkpoint_keeps_the_newest_epoch(small, tmp_path, delete):
    extra = ["--save-frequency", "1"] + (["--delete-previous-checkpoint"] if delete else [])
    run(parse_args(_argv(small, tmp_path, "run", *extra, epochs=3)), DistEnv())
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == (["epoch_3.pt"] if delete else ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"])
    if delete:
        assert "deleted " in (tmp_path / "run" / "out.log").read_text()
        assert C.load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_3.pt")["step"] == 3


def test_delete_previous_follows_openclips_rule(tmp_path):
    """epoch_{N - save_frequency}.pt goes once epoch_N.pt is written; other files stay."""
    for n in (2, 4, 5):
        (tmp_path / f"epoch_{n}.pt").write_bytes(b"x")
    (tmp_path / "epoch_latest.pt").write_bytes(b"x")
    assert C.delete_previous(tmp_path, 2, 2) is None  # nothing before the first
    assert C.delete_previous(tmp_path, 4, 2) == tmp_path / "epoch_2.pt"
    assert (
        C.delete_previous(tmp_path, 5, 2) is None
    )  # epoch_3.pt never existed (the last epoch is saved too)
    assert C.delete_previous(tmp_path, 5, 0) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_4.pt",
        "epoch_5.pt",
        "epoch_latest.pt",
    ]


def test_default_run_name_is_one_folder():
    args = parse_args(["--train-data", "x.jsonl", "--model", "ViT-L/14"])
    assert "/" not in args.name and "_model=ViT-L-14_" in args.name
    assert re.search(r"_date=\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d$", args.name)


def _broadcast_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from training.engine import broadcast_from_master

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    try:
        env = DistEnv(rank=rank, world_size=2, local_rank=rank, distributed=True)
        out[rank] = broadcast_from_master(env, f"name computed by rank {rank}")
    finally:
        dist.destroy_process_group()


def test_every_rank_takes_rank_0s_run_name():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_broadcast_worker, args=(port, out), nprocs=2, start_method="spawn")
        assert dict(out) == {0: "name computed by rank 0", 1: "name computed by rank 0"}
    assert (
        run.__code__.co_names.count("broadcast_from_master") >= 1
    )  # run() applies it to args.name


class _Clock:
    """time.time() that advances 10 s per call: every logged interval is a whole number of 10 s."""

    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        self.now += 10.0
        return self.now


def test_eta_counts_the_steps_up_to_stop_after_epoch(small, tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(train_module, "time", clock)
    argv = train_argv(small, tmp_path, "eta", "--stop-after-epoch", "1", batch_size=1, epochs=20)
    run(parse_args(argv), DistEnv())
    log = (tmp_path / "eta" / "out.log").read_text()
    etas = {
        int(step): int(h) * 3600 + int(m) * 60 + int(s)
        for step, h, m, s in re.findall(r"step (\d+) loss .* eta (\d+):(\d\d):(\d\d)", log)
    }
    assert sorted(etas) == [1, 2]  # two steps per epoch; the run stops after the first epoch
    assert etas[1] % 10 == 0 and 0 < etas[1] <= 60  # one step of the first epoch left, not 39
    assert etas[2] == 0  # the run's last step, although 19 epochs of the schedule remain
