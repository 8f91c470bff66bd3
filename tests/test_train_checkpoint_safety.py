"""No file that is read runs code: a checkpoint whose pickle would run code is refused by --resume and by
every other reader of training checkpoints, before any of it runs; the project's own checkpoints
(optimiser, scaler, RNG state, flags) load with torch.load(weights_only=True)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_data import make_dataset, one_torch_thread, train_argv  # noqa: F401 (autouse fixture)

from clip.clip import create_model
from training import checkpoint as C
from training.engine import build_optimizer
from training.params import parse_args

ROOT = Path(__file__).resolve().parents[1]


class _RunsCode:
    """Unpickles as a call of os.system: creating `marker` shows that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    model = create_model("tiny")
    torch.save({"epoch": 1, "state_dict": model.state_dict(), "hook": _RunsCode(marker)}, path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("safe"), n_images=2, caps_per_image=1, n_val=2)


def _commands(small, tmp_path, ckpt):
    return {
        "training/main_all.py --resume": [
            "training/main_all.py",
            *train_argv(small, tmp_path / "logs", "run", "--resume", str(ckpt), batch_size=2),
        ],
        "eval/extract_features.py --resume": [
            "eval/extract_features.py",
            "--extract-text-feats",
            "--text-data",
            str(tmp_path / "texts.jsonl"),
            "--text-feat-output-path",
            str(tmp_path / "out.jsonl"),
            "--resume",
            str(ckpt),
            "--model",
            "tiny",
            "--device",
            "cpu",
        ],
        "scripts/export_weights.py": [
            "scripts/export_weights.py",
            str(ckpt),
            str(tmp_path / "w.pt"),
        ],
    }


@pytest.mark.parametrize(
    "command",
    [
        "training/main_all.py --resume",
        "eval/extract_features.py --resume",
        "scripts/export_weights.py",
    ],
)
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(small, tmp_path, command):
    marker = tmp_path / "code_ran"
    ckpt = _malicious_checkpoint(tmp_path / "downloaded.pt", marker)
    (tmp_path / "texts.jsonl").write_text('{"query_id": 0, "query_text": "a dog"}\n')
    proc = subprocess.run(
        [sys.executable, *_commands(small, tmp_path, ckpt)[command]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(ckpt) in proc.stderr and "error:" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()  # the pickle's code never ran
    assert not (tmp_path / "logs" / "run" / "checkpoints").exists() or not any(
        (tmp_path / "logs" / "run" / "checkpoints").iterdir()
    )  # no training happened
    if command.startswith("training"):
        assert "could run code" in proc.stderr and "posix.system" in proc.stderr, proc.stderr


def test_the_file_really_runs_code_when_fully_unpickled(tmp_path):
    """The test above has teeth: torch.load(weights_only=False) of the same file runs its code."""
    marker = tmp_path / "code_ran"
    ckpt = _malicious_checkpoint(tmp_path / "downloaded.pt", marker)
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_a_full_training_checkpoint_loads_with_weights_only(tmp_path):
    """Everything a resumed run needs: weights, AdamW state, grad-scaler state, every RNG, the flags."""
    model = create_model("tiny")
    args = parse_args(["--train-data", "x.jsonl", "--model", "tiny", "--is-prompt"])
    opt = build_optimizer(model, args)
    model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 77, dtype=torch.long))[2].backward()
    opt.step()
    rng = C.rng_state()
    rng["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # what torch.cuda.get_rng_state_all gives
    state = {
        "epoch": 1,
        "step": 3,
        "steps_per_epoch": 3,
        "name": "run",
        "model": "tiny",
        "state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 0,
        },
        "rng": rng,
        "args": {k: v for k, v in vars(args).items() if k != "report"},
    }
    path = C.save_checkpoint(state, tmp_path / "epoch_1.pt")
    loaded = C.load_checkpoint(path)
    assert loaded["optimizer"]["state"].keys() == opt.state_dict()["state"].keys()
    assert loaded["args"]["is_prompt"] is True and loaded["scaler"]["scale"] == 65536.0
    C.set_rng_state(loaded["rng"])
    assert torch.equal(torch.get_rng_state(), rng["torch"])
