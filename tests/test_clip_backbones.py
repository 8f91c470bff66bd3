"""Other backbones and the --jit escape hatch through the scripts: OpenCLIP-style GELU checkpoints with
--model NAME (training, zero-shot extraction, table runner), and --jit reading archives with torch.jit.load."""

import json
import warnings

import numpy as np
import pytest
import torch
from _scripts import load_script

from agree.io import InputError
from agree.layout import Layout
from clip.clip import CLIP, create_model, load, model_config, tokenize
from clip.model import QuickGELU
from experiments.tables import TableRunner
from training.engine import build_model
from training.params import parse_args

ZS = load_script("eval/extract_features_zs_mask+prompt.py")
TABLES = load_script("scripts/reproduce_tables.py")


def _gelu_model(seed: int = 3) -> CLIP:
    torch.manual_seed(seed)
    return create_model("tiny-gelu").eval()


def _openclip_checkpoint(model: CLIP, path):
    """OpenCLIP's training-checkpoint form: {"epoch", "name", "state_dict" with 'module.' prefixes, ...}."""
    torch.save(
        {
            "epoch": 32,
            "name": "laion-run",
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )


def _traced_archive(model: CLIP, path):
    batch = (torch.randn(1, 3, 64, 64), tokenize(["a dog"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, batch, check_trace=False), str(path))


def _text_features(model: CLIP, texts):
    with torch.no_grad():
        f = model.encode_text(tokenize(texts)).float()
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def test_gelu_checkpoint_needs_its_model_name(tmp_path):
    model = _gelu_model()
    path = tmp_path / "open_clip_tiny.pt"
    _openclip_checkpoint(model, path)
    named, _, _ = load(path, device="cpu", model_name="tiny-gelu")
    assert isinstance(named.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    texts = ["a red circle", "two blue stars left of a green square"]
    np.testing.assert_allclose(
        _text_features(named, texts), _text_features(model, texts), rtol=0, atol=1e-6
    )
    unnamed, _, _ = load(path, device="cpu")  # the weights alone: OpenAI's QuickGELU, other outputs
    assert isinstance(unnamed.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert np.abs(_text_features(unnamed, texts) - _text_features(model, texts)).max() > 1e-3
    torch.save(
        model.state_dict(), tmp_path / "tiny-gelu.pt"
    )  # looked up by config name: that config is built
    by_name, _, _ = load("tiny-gelu", device="cpu", download_root=tmp_path)
    np.testing.assert_allclose(
        _text_features(by_name, texts), _text_features(model, texts), rtol=0, atol=1e-6
    )


def _train_args(tmp_path, *extra):
    return parse_args(
        ["--train-data", str(tmp_path / "train.jsonl"), "--openai-pretrained", *extra]
    )


def test_training_starts_from_a_gelu_checkpoint_with_model(tmp_path):
    model = _gelu_model()
    path = tmp_path / "open_clip_tiny.pt"
    _openclip_checkpoint(model, path)
    built = build_model(
        _train_args(tmp_path, "--pretrained-path", str(path), "--model", "tiny-gelu"),
        torch.device("cpu"),
        "fp32",
    )
    assert built.training and isinstance(
        built.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU
    )
    for k, v in model.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
    with pytest.raises(
        InputError, match=r"--openai-pretrained: .*open_clip_tiny\.pt: weights are not a ViT-B-32"
    ):
        build_model(
            _train_args(tmp_path, "--pretrained-path", str(path), "--model", "ViT-B-32"),
            torch.device("cpu"),
            "fp32",
        )


def test_training_jit_flag_is_the_only_way_to_torch_jit_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    archive = tmp_path / "tiny.pt"
    _traced_archive(create_model("tiny").eval(), archive)
    real_load, calls = torch.jit.load, []

    def spy(*args, **kwargs):
        calls.append(args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    args = _train_args(tmp_path, "--pretrained-path", str(archive), "--model", "tiny")
    assert args.jit is False
    plain = build_model(args, torch.device("cpu"), "fp32")
    assert calls == []
    jitted = build_model(
        _train_args(tmp_path, "--pretrained-path", str(archive), "--model", "tiny", "--jit"),
        torch.device("cpu"),
        "fp32",
    )
    assert len(calls) == 1 and isinstance(jitted, CLIP)
    for k, v in plain.state_dict().items():
        assert torch.equal(jitted.state_dict()[k], v), k


def test_zero_shot_extraction_with_model_name_and_jit(tmp_path):
    texts = ["a red circle", "a dog on the grass", "two stars"]
    data = tmp_path / "texts.jsonl"
    data.write_text(
        "".join(json.dumps({"query_id": i, "query_text": t}) + "\n" for i, t in enumerate(texts))
    )

    def extract(resume, *flags):
        out = tmp_path / f"{resume.stem}{len(flags)}.npy"
        assert (
            ZS.main(
                [
                    "--extract-text-feats",
                    f"--text-data={data}",
                    f"--resume={resume}",
                    "--device=cpu",
                    f"--text-feat-output-path={out}",
                    *flags,
                ]
            )
            == 0
        )
        return np.load(out)

    gelu = _gelu_model()
    checkpoint = tmp_path / "open_clip_tiny.pt"
    _openclip_checkpoint(gelu, checkpoint)
    np.testing.assert_allclose(
        extract(checkpoint, "--model=tiny-gelu"), _text_features(gelu, texts), atol=2e-5
    )
    torch.manual_seed(0)
    quick = create_model("tiny").eval()
    archive = tmp_path / "archive.pt"
    _traced_archive(quick, archive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_jit = extract(archive, "--model=tiny", "--jit")
    np.testing.assert_allclose(by_jit, _text_features(quick, texts), atol=2e-5)
    np.testing.assert_allclose(extract(archive), by_jit, rtol=0, atol=0)


def test_table_runner_passes_model_and_jit_through(tmp_path, monkeypatch):
    data_root, pretrained = (
        tmp_path / "datasets" / "flickr30k_images",
        tmp_path / "open_clip_tiny.pt",
    )
    args = TABLES.parse_args(
        [
            "--data-root",
            str(data_root),
            "--vg-root",
            str(tmp_path / "VG"),
            "--out",
            str(tmp_path / "out"),
            "--pretrained",
            str(pretrained),
            "--model",
            "tiny-gelu",
            "--jit",
        ]
    )
    assert args.jit and args.model == "tiny-gelu"
    for path in (
        pretrained,
        *Layout.from_data_dir(args.data_root, args.dataset, args.vg_root).test_files(),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    commands = {}
    monkeypatch.setattr(
        TableRunner,
        "run",
        lambda self, stage: commands.update({stage.name: (stage.script, list(stage.flags))}),
    )
    monkeypatch.setattr(TableRunner, "evaluate", lambda self, name, t, i: None)  # no rows
    runner = TableRunner(args)
    runner.zero_shot()
    runner.fine_tuned("AGREE", (), ("",), "Fine-tuning")
    for stage, script in (
        ("zeroshot.extract", "eval/extract_features_zs_mask+prompt.py"),
        ("agree.train", "training/main_all.py"),
    ):
        assert commands[stage][0] == script
        flags = commands[stage][1]
        assert "--jit" in flags and flags[flags.index("--model") + 1] == "tiny-gelu", stage
    extract_flags = commands["agree.extract"][
        1
    ]  # fine-tuned checkpoints are torch.save files: no --jit
    assert (
        "--jit" not in extract_flags
        and extract_flags[extract_flags.index("--model") + 1] == "tiny-gelu"
    )


def test_gelu_configs_exist_beside_openai_names():
    for name in ("ViT-B-32", "ViT-L-14", "RN50", "tiny"):
        gelu = model_config(f"{name}-gelu")
        assert gelu["activation"] == "gelu" and model_config(name)["activation"] == "quick_gelu"
        assert {k: v for k, v in gelu.items() if k != "activation"} == {
            k: v for k, v in model_config(name).items() if k != "activation"
        }
