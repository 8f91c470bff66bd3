"""Two gloo workers == one process with the same global batch: workers started by main_all.py itself (a plain
launch, as the release's mp.spawn) and by torchrun; the launch plan for GPUs; errors from workers."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_data import make_dataset, one_torch_thread, train_argv  # noqa: F401 (autouse fixture)

from agree.io import InputError
from clip.clip import create_model
from training.distributed import SINGLE, SPAWN, TORCHRUN, DistEnv, init_distributed, plan_launch
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


def _clean_env() -> dict:
    """This environment without torchrun's variables (a plain launch)."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _torchrun_like(argv: list[str], nproc: int = 2) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = dict(
            _clean_env(),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nproc),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-u", str(MAIN), *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"


def _plain_launch(argv: list[str]) -> subprocess.CompletedProcess:
    """`python3 -u training/main_all.py ...` as the README runs it (no torchrun)."""
    return subprocess.run(
        [sys.executable, "-u", str(MAIN), *argv, f"--dist-url=tcp://127.0.0.1:{_free_port()}"],
        env=dict(_clean_env(), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )


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
    return argv[:i] + argv[i + 2 :]


def _update(run_dir: Path) -> torch.Tensor:
    """Parameter change of the run's two steps (the initial weights are the seed-0 random init)."""
    torch.manual_seed(0)
    init = create_model("tiny").state_dict()
    after = torch.load(run_dir / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]
    return torch.cat([(after[k].float() - init[k].float()).flatten() for k in init])


def test_spawned_workers_match_one_process_with_the_same_global_batch(four, single, tmp_path):
    """--nproc 2 x batch 2 with --gather-with-grad == one process x batch 4: losses, gradients, weights."""
    proc = _plain_launch(
        _argv(four, tmp_path, "two", "--gather-with-grad", "--nproc", "2", batch_size=2)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "two" / "out.log").read_text()
    first = log.splitlines()[0]
    assert (
        "world size 2 (2 worker processes started by main_all.py, gloo); batch size 2 per worker, "
        "global batch 4" in first
    )
    two, one = _losses(tmp_path / "two" / "out.log"), _losses(single / "out.log")
    assert sorted(two) == sorted(one) == [1, 2]
    assert (
        len(two[1]) == len(one[1]) == 7
    )  # total + global + five terms, each over the global batch
    assert two[1] == pytest.approx(one[1], rel=2e-4, abs=2e-5)
    assert two[2] == pytest.approx(one[2], rel=2e-4, abs=2e-5)  # after the same first update
    # lr 1, eps 1: AdamW's first update is g / (|g| + 1) per weight, so equal updates mean equal gradients
    u1, u2 = _update(single), _update(tmp_path / "two")
    rel = ((u2 - u1).norm() / u1.norm()).item()
    assert rel < 2e-3, rel


def test_torchrun_workers_use_torchruns_world(four, single, tmp_path):
    _torchrun_like(_argv(four, tmp_path, "two", batch_size=2))
    two, one = _losses(tmp_path / "two" / "out.log"), _losses(single / "out.log")
    assert sorted(two) == sorted(one) == [1, 2]
    assert (
        "world size 2 (2 worker processes started by torchrun, gloo); batch size 2 per worker, global batch 4"
        in (tmp_path / "two" / "out.log").read_text().splitlines()[0]
    )
    # same weights, same global batch: the same loss and terms (every term sees the gathered batch)
    assert two[1] == pytest.approx(one[1], rel=2e-4, abs=2e-5)
    # without --gather-with-grad each rank only back-propagates through its own rows: half the gradient
    u1, u2 = _update(single), _update(tmp_path / "two")
    assert ((u2 - u1).norm() / u1.norm()).item() > 0.3


def test_an_input_error_in_spawned_workers_is_reported_once_without_traceback(four, tmp_path):
    with np.load(four["grounding"]) as z:
        np.savez(tmp_path / "grounding.npz", **{k: z[k] for k in z.files if k != "1002_horse"})
    argv = _argv(
        four,
        tmp_path / "logs",
        "bad",
        "--nproc",
        "2",
        "--grounding-images",
        str(tmp_path / "grounding.npz"),
        batch_size=2,
    )
    proc = _plain_launch(argv)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr.startswith("error: --is-vg (--grounding-images): ")
        and "'1002_horse'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "logs").exists()


# ------------------------------------------------------------------ launch plan (GPU cases need no GPU)
NO_ENV: dict = {}
TORCHRUN_ENV = {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize(
    "nproc,device,gpu,env,gpus,expected",
    [
        # a plain launch on a machine with 4 GPUs: 4 NCCL workers (the release's mp.spawn), global batch 4 x b
        (None, None, None, NO_ENV, 4, (SPAWN, 4, True, "nccl")),
        (None, "cuda", None, NO_ENV, 4, (SPAWN, 4, True, "nccl")),
        (2, None, None, NO_ENV, 4, (SPAWN, 2, True, "nccl")),
        (None, None, None, NO_ENV, 1, (SINGLE, 1, True, None)),
        # a fixed GPU: one process (the release's --gpu)
        (None, None, 2, NO_ENV, 4, (SINGLE, 1, True, None)),
        (None, "cuda:3", None, NO_ENV, 4, (SINGLE, 1, True, None)),
        # the CPU: one process unless --nproc asks for gloo workers
        (None, None, None, NO_ENV, 0, (SINGLE, 1, False, None)),
        (None, "cpu", None, NO_ENV, 4, (SINGLE, 1, False, None)),
        (3, "cpu", None, NO_ENV, 4, (SPAWN, 3, False, "gloo")),
        # torchrun: its world
        (None, None, None, TORCHRUN_ENV, 4, (TORCHRUN, 4, True, "nccl")),
        (None, "cpu", None, TORCHRUN_ENV, 0, (TORCHRUN, 4, False, "gloo")),
    ],
)
def test_launch_plan(nproc, device, gpu, env, gpus, expected):
    plan = plan_launch(nproc, device, gpu, None, environ=env, cuda_devices=gpus)
    assert (plan.launcher, plan.world_size, plan.use_cuda, plan.backend) == expected


@pytest.mark.parametrize(
    "nproc,device,gpu,env,gpus,message",
    [
        (5, None, None, NO_ENV, 4, "one worker per GPU, but 4 GPU"),
        (0, "cpu", None, NO_ENV, 0, "--nproc must be >= 1"),
        (2, None, 1, NO_ENV, 4, "puts worker k on GPU k"),
        (2, "cuda:1", None, NO_ENV, 4, "puts worker k on GPU k"),
        (2, None, None, TORCHRUN_ENV, 4, "started by torchrun"),
    ],
)
def test_launch_plan_errors(nproc, device, gpu, env, gpus, message):
    with pytest.raises(InputError, match=message):
        plan_launch(nproc, device, gpu, None, environ=env, cuda_devices=gpus)


def test_cpu_worker_environment():
    plan = plan_launch(None, "cpu", None, None, environ=NO_ENV, cuda_devices=0)
    env = init_distributed(plan, 0, "cpu", "tcp://127.0.0.1:1", environ=NO_ENV)
    assert (env.rank, env.world_size, env.distributed, env.device.type, env.launcher) == (
        0,
        1,
        False,
        "cpu",
        SINGLE,
    )
    assert plan.describe() == "one process"
    assert (
        plan_launch(2, "cpu", None, None, NO_ENV, 0).describe()
        == "2 worker processes started by main_all.py, gloo"
    )
