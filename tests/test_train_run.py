"""Fine-tuning end to end on the tiny model: each flag alone, the README recipe, overfitting, resume, checkpoints."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_data import make_dataset, one_torch_thread, train_argv  # noqa: F401 (autouse fixture)

from agree.io import InputError
from agree.precision import resolve_precision
from clip.clip import create_model, load
from training import checkpoint as C
from training.data import resolve_paths
from training.dataset import build_train_dataset
from training.distributed import DistEnv
from training.engine import build_optimizer, run
from training.params import parse_args
from training.scheduler import lr_at
from training.terms import enabled_terms
from training.train import StepConfig, compute_loss, train_step
from training.validation import retrieval_metrics

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "training" / "main_all.py"
PY = sys.executable
STEP_RE = re.compile(r"step (\d+) loss ([0-9.]+) \(([^)]*)\)")


def log_losses(log: Path) -> dict[int, str]:
    """Global step -> 'loss ... (terms)' text of every logged step."""
    return {
        int(m.group(1)): f"{m.group(2)} {m.group(3)}" for m in STEP_RE.finditer(log.read_text())
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("small"), n_images=2, caps_per_image=1, n_val=2)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("medium"), n_images=4, caps_per_image=2, n_val=2)


@pytest.mark.parametrize(
    "flag,term,weight",
    [
        ("--is-prompt", "prompt", 0.03),
        ("--is-mask", "text_mask", 0.10),
        ("--is-da-loss", "vg_contrastive", 0.03),
        ("--is-da-mask", "vg_mask", 0.15),
        ("--is-vg", "grounding_mask", 0.10),
    ],
)
def test_each_flag_alone_trains(small, tmp_path, flag, term, weight):
    args = parse_args(train_argv(small, tmp_path, "run", flag, batch_size=2, epochs=2))
    res = run(args, DistEnv(), keep_history=True)
    assert [s for s, _ in res.history] == [1, 2]
    for _, losses in res.history:
        assert set(losses) == {"loss", "global", term}
        assert all(math.isfinite(v) for v in losses.values())
        assert losses["loss"] == pytest.approx(
            0.9 * losses["global"] + weight * losses[term], rel=1e-5
        )
    assert len(res.val) == 2 and set(res.val[0][1]) >= {
        "val_loss",
        "i2t_r1",
        "t2i_r10",
    }
    run_dir = tmp_path / "run"
    assert (run_dir / "params.txt").is_file() and (run_dir / "checkpoints" / "epoch_2.pt").is_file()
    assert "Eval Epoch: 2" in (run_dir / "out.log").read_text()


def test_readme_recipe_runs_verbatim_with_tiny_model(tmp_path):
    """The seed README's training command, DATAPATH at a release-layout dataset, --model tiny (one epoch)."""
    paths = make_dataset(tmp_path / "tmp", n_images=8, caps_per_image=1, n_val=2)
    pretrained = tmp_path / "tmp" / "pretrained_models" / "tiny.pt"
    pretrained.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(create_model("tiny").state_dict(), pretrained)
    datapath = "./tmp/datasets/flickr30k_images"
    assert Path(tmp_path, datapath) == paths["data_root"]
    cmd = [
        PY,
        "-u",
        str(MAIN),
        "--save-frequency",
        "2",
        "--report-to",
        "tensorboard",
        f"--train-data={datapath}/annotation/flickr30k_train_pred.jsonl",
        f"--val-data={datapath}/annotation/flickr30k_val.json",
        "--img-key",
        "image",
        "--caption-key",
        "caption",
        "--dataset-type",
        "json",
        "--is-mask",
        "--is-prompt",
        "--is-da-loss",
        "--is-da-mask",
        "--is-vg",
        "--dist-url=tcp://127.0.0.1:13526",
        "--warmup",
        "10000",
        "--batch-size=8",
        "--lr=1e-5",
        "--wd=0.1",
        "--epochs=50",
        "--workers=0",
        "--model",
        "tiny",
        "--openai-pretrained",
        "--epochs=1",
    ]  # the only change: one epoch instead of 50
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1
    assert re.fullmatch(
        r"lr=1e-05_wd=0\.1_agg=True_model=tiny_batchsize=8_workers=0_date="
        r"\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d",
        runs[0].name,
    )
    run_dir = runs[0]
    assert (run_dir / "params.txt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    log = (run_dir / "out.log").read_text()
    # no GPU here: the plain launch is one process (on N GPUs it would start N workers, see test_train_dist)
    assert log.splitlines()[0].endswith(
        "world size 1 (one process); batch size 8 per worker, global batch 8"
    )
    assert "Train Epoch: 0 [1/1] step 1" in log and "Eval Epoch: 1" in log
    for term in ("global", "prompt", "text_mask", "vg_contrastive", "vg_mask", "grounding_mask"):
        assert f"{term} " in log
    ckpt = torch.load(
        run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False
    )
    assert {"epoch", "name", "state_dict", "optimizer", "scaler", "step", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 1 and ckpt["name"] == run_dir.name
    # started from the pretrained weights, and the checkpoint loads back as a CLIP model
    start = torch.load(pretrained, weights_only=True)
    moved = max(
        (ckpt["state_dict"][k].float() - v.float()).abs().max().item() for k, v in start.items()
    )
    assert 0 < moved < 1e-3  # one warm-up step at lr 1e-5/10000
    torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)  # plain types only
    model, _, _ = load(str(run_dir / "checkpoints" / "epoch_1.pt"))
    assert model.visual.input_resolution == 64


def test_tiny_overfit_drives_the_loss_down(tmp_path):
    paths = make_dataset(tmp_path / "d", n_images=4, caps_per_image=1, n_val=2)
    argv = train_argv(paths, tmp_path, "fit", "--is-mask", "--is-vg", batch_size=4, epochs=30)
    argv += ["--lr", "5e-4", "--warmup", "3", "--save-frequency", "0"]
    argv.remove("--val-data")
    argv.remove(str(paths["val"]))
    res = run(parse_args(argv), DistEnv(), keep_history=True)
    losses = [h["loss"] for _, h in res.history]
    assert len(losses) == 30
    # chance level of the global term for 4 pairs is ln 4 = 1.386
    assert losses[-1] < 0.4 * losses[0], losses
    assert res.history[-1][1]["global"] < 0.4 * math.log(4)


def _batch(paths, *flags, n=2):
    args = parse_args(["--train-data", str(paths["train"]), "--model", "tiny", *flags])
    dset = build_train_dataset(args, resolve_paths(args), enabled_terms(args), 64)
    return torch.utils.data.default_collate([dset[i] for i in range(n)]), enabled_terms(args)


def test_ranking_terms_train_the_towers_unless_legacy(medium):
    batch, terms = _batch(medium, "--is-mask", "--is-da-mask", "--is-vg", n=4)
    torch.manual_seed(0)
    model = create_model("tiny")
    for term in ("text_mask", "vg_mask", "grounding_mask"):
        model.zero_grad()
        _, values = compute_loss(model, batch, StepConfig(terms=terms, env=DistEnv()))
        assert values[term].item() > 0, term
        values[term].backward()
        grad = sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None)
        assert grad > 0, term
        model.zero_grad()
        _, legacy = compute_loss(
            model, batch, StepConfig(terms=terms, env=DistEnv(), legacy_detached_rank=True)
        )
        assert legacy[term].item() == pytest.approx(values[term].item(), rel=1e-5)
        legacy[
            term
        ].backward()  # as in the release: only the logit scale gets gradient from the term
        moved = {
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        assert moved == {"logit_scale"}, term


def test_logit_scale_is_clamped_after_each_step(small):
    batch, terms = _batch(small)
    model = create_model("tiny")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = StepConfig(terms=terms, env=DistEnv())
    for start, expected in ((7.0, math.log(100)), (-2.0, 0.0), (3.0, 3.0)):
        with torch.no_grad():
            model.logit_scale.fill_(start)
        train_step(model, batch, opt, None, cfg)
        assert model.logit_scale.item() == pytest.approx(expected, abs=1e-6)


def test_adamw_groups_and_default_hyperparameters():
    args = parse_args(["--train-data", "x.jsonl", "--model", "tiny", "--wd", "0.3"])
    assert (args.lr, args.beta1, args.beta2, args.eps) == (5e-4, 0.9, 0.98, 1e-6)
    assert parse_args(["--train-data", "x.jsonl", "--model", "ViT-L/14"]).lr == 4e-4
    assert parse_args(["--train-data", "x.jsonl", "--model", "ViT-B/32"]).lr == 5e-4
    model = create_model("tiny")
    opt = build_optimizer(model, args)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[1]["weight_decay"] == 0.3
    assert {
        "logit_scale",
        "ln_final.weight",
        "ln_final.bias",
        "visual.ln_post.weight",
        "transformer.resblocks.0.attn.in_proj_bias",
    } <= no_decay
    assert {
        "visual.conv1.weight",
        "token_embedding.weight",
        "text_projection",
        "transformer.resblocks.0.attn.in_proj_weight",
    } <= decay
    assert no_decay.isdisjoint(decay) and no_decay | decay == set(names.values())
    assert all(any(k in n for k in ("bn", "ln", "bias", "logit_scale")) for n in no_decay)


def test_warmup_then_cosine_schedule():
    base, warmup, total = 1e-3, 4, 14
    assert [lr_at(s, base, warmup, total) for s in range(4)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    )
    assert lr_at(4, base, warmup, total) == pytest.approx(1e-3)
    assert lr_at(9, base, warmup, total) == pytest.approx(0.5e-3)  # half way through the decay
    assert lr_at(6, base, warmup, total) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * 0.2))
    )
    assert lr_at(14, base, warmup, total) == pytest.approx(0.0, abs=1e-12)


def test_retrieval_metrics_by_hand():
    img = torch.eye(3)
    # captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    owner = [0, 0, 1, 1, 2]
    txt = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.9, 0.1], [0, 0.8, 0.2], [0.7, 0, 0.3]])
    m = retrieval_metrics(img, txt, owner, 1.0, batch_size=10)
    # T2I ranks of the own image: 0, 1 (image 1 wins), 0, 0, 1 -> R@1 = 3/5
    assert m["t2i_r1"] == pytest.approx(60.0)
    assert m["t2i_r5"] == pytest.approx(100.0)
    # I2T: image 0's best own caption #0 (1.0) is first: rank 0; image 1's best own #2 (0.9) is beaten by
    # #1 (1.0): rank 1; image 2 scores the captions [0, 0, .1, .2, .3], its own #4 first: rank 0
    assert m["i2t_r1"] == pytest.approx(200.0 / 3)
    assert m["i2t_r5"] == pytest.approx(100.0)

    # loss: pairs (img0,cap0),(img1,cap2),(img2,cap4) then (img0,cap1),(img1,cap3)
    def ce(rows):
        return sum(math.log(sum(math.exp(v) for v in r)) - r[i] for i, r in enumerate(rows)) / len(
            rows
        )

    def pair_loss(imgs, caps):
        a = [img[i].tolist() for i in imgs]
        b = [txt[c].tolist() for c in caps]
        ab = [[sum(x * y for x, y in zip(u, v)) for v in b] for u in a]
        ba = [list(col) for col in zip(*ab)]
        return (ce(ab) + ce(ba)) / 2

    expected = (pair_loss([0, 1, 2], [0, 2, 4]) * 3 + pair_loss([0, 1], [1, 3]) * 2) / 5
    assert m["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "epoch_latest.pt"
    C.save_checkpoint({"step": 1, "state_dict": {}}, path)
    before = path.read_bytes()

    def dying_save(obj, f):
        Path(f).write_bytes(b"partial checkpoint")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(C.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint({"step": 2, "state_dict": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["epoch_latest.pt"]
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 1


def test_find_latest_and_resume_errors(tmp_path, small):
    d = tmp_path / "ck"
    assert C.find_latest(d) is None
    d.mkdir()
    for n in (2, 10, 9):
        (d / f"epoch_{n}.pt").write_bytes(b"")
    assert C.find_latest(d).name == "epoch_10.pt"
    (d / "epoch_latest.pt").write_bytes(b"")
    assert C.find_latest(d).name == "epoch_latest.pt"
    with pytest.raises(InputError, match="--resume latest needs --name"):
        parse_args(["--train-data", "x.jsonl", "--resume", "latest"])
    # --resume latest without a checkpoint starts a new run: tests/test_train_requeue.py
    wrong = tmp_path / "rn50.pt"
    torch.save({"epoch": 1, "state_dict": {"visual.conv1.weight": torch.zeros(3)}}, wrong)
    with pytest.raises(InputError, match="--resume: .*rn50.pt does not fit --model tiny"):
        run(
            parse_args(train_argv(small, tmp_path, "wrong", "--resume", str(wrong), batch_size=2)),
            DistEnv(),
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "out.log").write_text("")
    with pytest.raises(InputError, match="already exists"):
        run(parse_args(train_argv(small, tmp_path, "taken")), DistEnv())


def test_kill_and_resume_reproduces_the_uninterrupted_losses(medium, tmp_path):
    flags = ("--is-prompt", "--is-da-mask", "--is-vg")
    common = ["--save-frequency", "1", "--save-every-n-steps", "3"]
    # uninterrupted: 2 epochs x 4 steps
    ref = run(
        parse_args(train_argv(medium, tmp_path, "ref", *flags, *common, batch_size=2, epochs=2)),
        DistEnv(),
        keep_history=True,
    )
    ref_losses = log_losses(tmp_path / "ref" / "out.log")
    assert sorted(ref_losses) == list(range(1, 9)) and len(ref.history) == 8

    # the same run as a process, killed (SIGKILL) once it has written a mid-epoch checkpoint
    argv = train_argv(medium, tmp_path, "killed", *flags, *common, batch_size=2, epochs=2)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [PY, "-u", str(MAIN), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    log = tmp_path / "killed" / "out.log"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and "(step 3)" in log.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = C.load_checkpoint(tmp_path / "killed" / "checkpoints" / "epoch_latest.pt")
    assert 3 <= saved["step"] < 8
    killed_at = max(log_losses(log))
    assert killed_at < 8

    res = run(
        parse_args(
            train_argv(
                medium,
                tmp_path,
                "killed",
                *flags,
                *common,
                "--resume",
                "latest",
                batch_size=2,
                epochs=2,
            )
        ),
        DistEnv(),
        keep_history=True,
    )
    assert [s for s, _ in res.history] == list(range(saved["step"] + 1, 9))
    resumed = log_losses(
        log
    )  # the log is appended to: steps before the kill, then the resumed ones
    for step in range(1, 9):
        assert resumed[step] == ref_losses[step], step
    # and the final weights equal the uninterrupted run's
    a = torch.load(tmp_path / "ref" / "checkpoints" / "epoch_2.pt", weights_only=False)[
        "state_dict"
    ]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "epoch_2.pt", weights_only=False)[
        "state_dict"
    ]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precision_defaults_and_cpu_fallbacks():
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision(None, torch.device("cuda", 0)) == "amp"
    assert resolve_precision("fp16", torch.device("cuda", 0)) == "fp16"
    assert resolve_precision("amp", torch.device("cpu")) == "fp32"
    with pytest.raises(InputError, match="--precision fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))


def test_flag_value_errors(small, tmp_path):
    with pytest.raises(InputError, match="--batch-size must be >= 1"):
        parse_args(["--train-data", "x.jsonl", "--batch-size", "0"])
    with pytest.raises(InputError, match="--report-to"):
        parse_args(["--train-data", "x.jsonl", "--report-to", "mlflow"])
    with pytest.raises(SystemExit):  # argparse: the following arguments are required: --train-data
        parse_args([])
    with pytest.raises(InputError, match="fewer than one global batch"):
        run(parse_args(train_argv(small, tmp_path, "big", batch_size=64)), DistEnv())


def test_stop_after_epoch_writes_the_checkpoint_of_the_full_schedule(small, tmp_path):
    full = parse_args(
        train_argv(small, tmp_path, "full", "--save-frequency", "2", batch_size=2, epochs=3)
    )
    run(full, DistEnv())
    stopped = parse_args(
        train_argv(
            small,
            tmp_path,
            "stopped",
            "--stop-after-epoch",
            "2",
            "--save-frequency",
            "5",
            batch_size=2,
            epochs=3,
        )
    )
    res = run(stopped, DistEnv(), keep_history=True)
    assert [s for s, _ in res.history] == [1, 2] and res.final_step == 2
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == [
        "epoch_2.pt"
    ]
    a = torch.load(tmp_path / "full" / "checkpoints" / "epoch_2.pt", weights_only=True)[
        "state_dict"
    ]
    b = torch.load(tmp_path / "stopped" / "checkpoints" / "epoch_2.pt", weights_only=True)[
        "state_dict"
    ]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same learning rates as the 3-epoch run
    with pytest.raises(InputError, match="--stop-after-epoch must be between 1 and --epochs"):
        parse_args(train_argv(small, tmp_path, "x", "--stop-after-epoch", "4", epochs=3))


def test_model_defaults_to_the_recipes_vit_l_14():
    args = parse_args(["--train-data", "x.jsonl"])
    assert args.model == "ViT-L/14" and args.lr == 4e-4
