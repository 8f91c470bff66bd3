"""Two gloo processes launched as torchrun launches them == one process with the same global batch."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_data import make_dataset, one_torch_thread, train_argv  # noqa: F401 (autouse fixture)
from clip.clip import create_model
from training.distributed import DistEnv
from training.engine import run
from training.params import parse_args

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "training" / "main_all.py"
STEP_RE = re.compile(r"step (\d+) loss ([0-9.]+) \(([^)]*)\)")
FLAGS = ("--is-prompt", "--is-mask", "--is-da-loss", "--is-da-mask", "--is-vg")
# lr 1 with eps 1: the first AdamW update is ~ the gradient itself, so it shows the gradient's scale
OPT = ("--lr", "1.0", "--eps", "1.0", "--wd", "0", "--warmup", "1", "--save-frequency", "2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(log: Path) -> dict[int, list[float]]:
    out = {}
    for m in STEP_RE.finditer(log.read_text()):
        terms = m.group(3).split()
        out[int(m.group(1))] = [float(m.group(2))] + [float(v) for v in terms[1::2]]
    return out


def _torchrun_like(argv: list[str], nproc: int = 2) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-u", str(MAIN), *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("four"), n_images=4, caps_per_image=1, n_val=2)


@pytest.fixture(scope="module")
def single(four, tmp_path_factory):
    """One process, global batch 4, 2 epochs of 1 step."""
    logs = tmp_path_factory.mktemp("single")
    run(parse_args(_argv(four, logs, "one", batch_size=4)), DistEnv())
    return logs / "one"


def _argv(paths: dict, logs: Path, name: str, *extra: str, batch_size: int) -> list[str]:
    argv = train_argv(paths, logs, name, *FLAGS, *OPT, *extra, batch_size=batch_size, epochs=2)
    i = argv.index("--val-data")
    return argv[:i] + argv[i + 2:]


def _update(run_dir: Path) -> torch.Tensor:
    """Parameter change of the run's two steps (the initial weights are the seed-0 random init)."""
    torch.manual_seed(0)
    init = create_model("tiny").state_dict()
    after = torch.load(run_dir / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    return torch.cat([(after[k].float() - init[k].float()).flatten() for k in init])


@pytest.mark.parametrize("gather_with_grad", [False, True])
def test_two_ranks_match_one_process_with_the_same_global_batch(four, single, tmp_path, gather_with_grad):
    extra = ("--gather-with-grad",) if gather_with_grad else ()
    _torchrun_like(_argv(four, tmp_path, "two", *extra, batch_size=2))
    two, one = _losses(tmp_path / "two" / "out.log"), _losses(single / "out.log")
    assert sorted(two) == sorted(one) == [1, 2]
    assert "world size 2" in (tmp_path / "two" / "out.log").read_text()
    # same weights, same global batch: the same loss and terms (every term sees the gathered batch)
    assert len(two[1]) == len(one[1]) == 7       # total + global + five terms
    assert two[1] == pytest.approx(one[1], rel=2e-4, abs=2e-5)
    if gather_with_grad:      # the same update, so the next step's loss matches too
        assert two[2] == pytest.approx(one[2], rel=2e-4, abs=2e-5)

    u1, u2 = _update(single), _update(tmp_path / "two")
    rel = ((u2 - u1).norm() / u1.norm()).item()
    if gather_with_grad:
        # gradients flow through the gathered copies: the same update as one process
        assert rel < 2e-3, rel
    else:
        # without it each rank only back-propagates through its own rows: half the gradient
        assert rel > 0.3, rel
