"""Feature extraction scripts with a tiny random CLIP: outputs, entity slots, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _scripts import load_script

from agree.io import InputError
from clip.clip import create_model, tokenize
from clip.transform import array_to_tensor
from eval.feature_io import read_features

FT = load_script("eval/extract_features.py")
ZS = load_script("eval/extract_features_zs_mask+prompt.py")

ITEMS = [[], ["a dog"], ["a dog", "a cat"], [f"thing{i}" for i in range(12)]]


def caption(q):
    return f"a dog and a cat near thing1 number {q}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    sd = model.state_dict()
    torch.save(sd, d / "tiny_openai.pt")
    torch.save(
        {"epoch": 2, "name": "t", "state_dict": {"module." + k: v for k, v in sd.items()}},
        d / "epoch_2.pt",
    )
    rng = np.random.default_rng(0)
    images = {str(9000 + i): rng.standard_normal((3, 64, 64)).astype(np.float32) for i in range(5)}
    images["77"] = rng.integers(
        0, 256, (64, 64, 3), dtype=np.uint8
    )  # raw RGB: normalised on the fly
    np.savez(d / "images.npz", **images)
    (d / "texts.jsonl").write_text(
        "".join(
            json.dumps({"query_id": q, "query_text": caption(q), "item_ids": [9000]}) + "\n"
            for q in range(7)
        )
    )
    (d / "segs.jsonl").write_text(
        "".join(
            json.dumps({"query_id": q, "query_text": caption(q), "items": ITEMS[q % 4]}) + "\n"
            for q in range(7)
        )
    )
    return {"dir": d, "model": model, "images": images}


def encode_text(model, texts):
    with torch.no_grad():
        f = model.encode_text(tokenize(texts)).float()
    return (f / f.norm(dim=-1, keepdim=True)).numpy()


def ft_args(d, out, **over):
    args = {
        "image-data": d / "images.npz",
        "text-data": d / "texts.jsonl",
        "img-batch-size": 4,
        "text-batch-size": 3,
        "resume": d / "epoch_2.pt",
        "image-feat-output-path": out / "img.jsonl",
        "text-feat-output-path": out / "txt.jsonl",
        "model": "tiny",
        "device": "cpu",
    }
    args.update(over)
    return ["--extract-image-feats", "--extract-text-feats"] + [
        f"--{k}={v}" for k, v in args.items()
    ]


def test_finetuned_extraction_matches_direct_encoding(env, tmp_path):
    d, model = env["dir"], env["model"]
    assert FT.main(ft_args(d, tmp_path)) == 0
    img = read_features(tmp_path / "img.jsonl", "image_id")
    assert img.ids == list(env["images"])  # npz key order, keys as strings
    with torch.no_grad():
        for key, row in zip(img.ids, img.data):
            f = model.encode_image(array_to_tensor(env["images"][key], 64)[None]).float()[0]
            np.testing.assert_allclose(row, (f / f.norm()).numpy(), atol=2e-5)
    txt = read_features(tmp_path / "txt.jsonl", "query_id")
    assert txt.ids == list(range(7))
    np.testing.assert_allclose(
        txt.data, encode_text(model, [caption(q) for q in range(7)]), atol=2e-5
    )


def test_zero_shot_slots_follow_the_spec(env, tmp_path):
    d, model = env["dir"], env["model"]
    assert (
        ZS.main(
            [
                "--extract-text-feats",
                "--extract-mask-feats",
                "--extract-prompt-feats",
                f"--text-data={d / 'texts.jsonl'}",
                f"--prompt-data={d / 'segs.jsonl'}",
                "--text-batch-size=3",
                f"--resume={d / 'tiny_openai.pt'}",
                "--model=tiny",
                "--device=cpu",
                f"--text-feat-output-path={tmp_path / 'txt.jsonl'}",
                f"--mask-feat-output-path={tmp_path / 'mask.jsonl'}",
                f"--prompt-feat-output-path={tmp_path / 'prompt.npy'}",
            ]
        )
        == 0
    )
    prompt = read_features(tmp_path / "prompt.npy", "query_id", slots=True)
    mask = read_features(tmp_path / "mask.jsonl", "query_id", slots=True)
    for f in (prompt, mask):
        assert f.ids == list(range(7)) and f.data.shape[1] == 10
        assert f.n_real.tolist() == [min(len(ITEMS[q % 4]), 10) for q in range(7)]
    for q in (0, 2, 3):
        items = ITEMS[q % 4][:10]
        pad = [""] * (10 - len(items))
        want_p = encode_text(model, [f"a photo containing {x}" for x in items] + pad)
        want_m = encode_text(model, [caption(q).replace(x, "[MASK]") for x in items] + pad)
        np.testing.assert_allclose(prompt.data[q], want_p, atol=2e-5)
        np.testing.assert_allclose(mask.data[q], want_m, atol=2e-5)


def test_extracted_features_run_through_real_slot_egr(env, tmp_path):
    d = env["dir"]
    assert (
        ZS.main(
            [
                "--extract-image-feats",
                "--extract-text-feats",
                "--extract-mask-feats",
                "--extract-prompt-feats",
                f"--image-data={d / 'images.npz'}",
                f"--text-data={d / 'texts.jsonl'}",
                f"--prompt-data={d / 'segs.jsonl'}",
                f"--resume={d / 'tiny_openai.pt'}",
                "--device=cpu",
                *(
                    f"--{n}-feat-output-path={tmp_path / n}.jsonl"
                    for n in ("image", "text", "mask", "prompt")
                ),
            ]
        )
        == 0
    )
    egr = load_script("eval/make_topk_predictions_mask+prompt.py")
    out = tmp_path / "pred"
    assert (
        egr.main(
            [
                f"--image-feats={tmp_path / 'image.jsonl'}",
                f"--text-feats={tmp_path / 'text.jsonl'}",
                f"--mask-feats={tmp_path / 'mask.jsonl'}",
                f"--prompt-feats={tmp_path / 'prompt.jsonl'}",
                "--top-k=4",
                "--real-slots-only",
                "--device=cpu",
                f"--output-images={out / 'i.jsonl'}",
                f"--output-texts={out / 't.jsonl'}",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (out / "t.jsonl").read_text().splitlines()]
    assert [r["query_id"] for r in rows] == list(range(7))
    assert all(
        len(r["item_ids"]) == 4 and all(e[0] in env["images"] for e in r["item_ids"]) for r in rows
    )


def test_wrong_model_name_for_the_weights(env, tmp_path):
    with pytest.raises(InputError, match="ViT-B-32"):
        ZS.main(
            [
                "--extract-text-feats",
                f"--text-data={env['dir'] / 'texts.jsonl'}",
                "--device=cpu",
                f"--resume={env['dir'] / 'tiny_openai.pt'}",
                "--model=ViT-B/32",
                f"--text-feat-output-path={tmp_path / 't.jsonl'}",
            ]
        )
    with pytest.raises(InputError, match="epoch_2.pt"):
        FT.main(ft_args(env["dir"], tmp_path, model="ViT-B-32"))
    assert list(tmp_path.iterdir()) == []


def test_bad_image_leaves_no_output(env, tmp_path):
    images = dict(env["images"], bad=np.zeros((5, 5), np.float32))
    np.savez(tmp_path / "bad.npz", **images)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"bad\.npz.*'bad'"):
        FT.main(ft_args(env["dir"], out, **{"image-data": tmp_path / "bad.npz"}))
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_caption_files_name_file_and_line(env, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"query_id": 0, "query_text": "x"}\n{"query_id": 1}\n')
    with pytest.raises(InputError, match=r"texts\.jsonl:2: missing key 'query_text'"):
        FT.main(ft_args(env["dir"], tmp_path / "o", **{"text-data": texts}))
    segs = tmp_path / "segs.jsonl"
    segs.write_text('{"query_id": 0, "query_text": "x", "items": "a dog"}\n')
    with pytest.raises(InputError, match=r"segs\.jsonl:1: 'items' must be a list"):
        ZS.main(
            [
                "--extract-prompt-feats",
                f"--prompt-data={segs}",
                f"--resume={env['dir'] / 'tiny_openai.pt'}",
                f"--prompt-feat-output-path={tmp_path / 'o' / 'p.jsonl'}",
                "--device=cpu",
            ]
        )
    with pytest.raises(InputError, match="--text-feat-output-path"):
        FT.main(
            [
                "--extract-text-feats",
                f"--text-data={env['dir'] / 'texts.jsonl'}",
                "--model=tiny",
                f"--resume={env['dir'] / 'epoch_2.pt'}",
                "--device=cpu",
            ]
        )
    assert not (tmp_path / "o").exists()


def _launch(script: str, argv: list[str], nproc: int) -> str:
    """Run a script in this process with one torch thread (nproc 0), or under torchrun with nproc CPU
    (gloo) processes of one thread each (torchrun's default); return the torchrun output."""
    import os
    import subprocess
    import sys

    if nproc == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert load_script(script).main(argv) == 0
        finally:
            torch.set_num_threads(threads)
        return ""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--"]
    proc = subprocess.run(
        [sys.executable, *launcher, str(root / script), *argv],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_torchrun_extraction_writes_the_single_process_files(env, tmp_path):
    """2 gloo processes shard the inputs by whole batches; rank 0 writes one file per set, in input order."""
    d = env["dir"]
    ft = [
        "--extract-image-feats",
        "--extract-text-feats",
        f"--image-data={d / 'images.npz'}",
        f"--text-data={d / 'texts.jsonl'}",
        "--img-batch-size=4",
        "--text-batch-size=3",
        f"--resume={d / 'epoch_2.pt'}",
        "--model=tiny",
        "--device=cpu",
    ]
    zs = [
        "--extract-text-feats",
        "--extract-mask-feats",
        "--extract-prompt-feats",
        f"--text-data={d / 'texts.jsonl'}",
        f"--prompt-data={d / 'segs.jsonl'}",
        "--text-batch-size=2",
        f"--resume={d / 'tiny_openai.pt'}",
        "--device=cpu",
        "--extract-image-feats",
        f"--image-data={d / 'images.npz'}",
        "--img-batch-size=32",
    ]  # 1 image batch: a rank idle
    logs = []
    for nproc in (0, 2):
        out = tmp_path / f"n{nproc}"
        logs.append(
            _launch(
                "eval/extract_features.py",
                ft
                + [
                    f"--image-feat-output-path={out / 'img.jsonl'}",
                    f"--text-feat-output-path={out / 'txt.npy'}",
                ],
                nproc,
            )
        )
        logs.append(
            _launch(
                "eval/extract_features_zs_mask+prompt.py",
                zs
                + [
                    f"--{n}-feat-output-path={out / 'zs'}_{n}.{'npy' if n == 'prompt' else 'jsonl'}"
                    for n in ("image", "text", "mask", "prompt")
                ],
                nproc,
            )
        )
    # 6 images in batches of 4, 7 captions in batches of 3 (2), each rank its run of whole batches
    assert "rank 1 of 2 encodes images [4, 6), captions [3, 7)" in logs[2]
    assert (
        "rank 0 of 2 encodes images [0, 0), captions [0, 4), entity slots [0, 4)" in logs[3]
    )  # 1 image batch
    one, two = tmp_path / "n0", tmp_path / "n2"
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert len(names) == 8  # img, txt (+ ids), zs image, text, mask, prompt (+ ids)
    for name in names:
        assert (two / name).read_bytes() == (one / name).read_bytes(), (
            name
        )  # bit for bit, ids in input order
    assert read_features(two / "img.jsonl", "image_id").ids == list(env["images"])


def test_extraction_defaults_to_fp32_and_fp16_runs_half_weights_on_the_cpu(env, tmp_path):
    from eval.extraction import resolve_extraction_precision

    assert (
        resolve_extraction_precision(None, torch.device("cuda", 0)) == "fp32"
    )  # the release's precision
    assert resolve_extraction_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_extraction_precision("fp16", torch.device("cpu")) == "fp16"
    assert FT.main(ft_args(env["dir"], tmp_path / "half", precision="fp16")) == 0
    assert FT.main(ft_args(env["dir"], tmp_path / "full")) == 0
    half = read_features(tmp_path / "half" / "txt.jsonl", "query_id").data
    full = read_features(tmp_path / "full" / "txt.jsonl", "query_id").data
    np.testing.assert_allclose(half, full, atol=2e-2)  # fp16 rounding, not another computation
    assert not np.array_equal(half, full)
    for precision in ("bf16", "amp_bf16"):  # bfloat16 weights / autocast: also rounding only
        assert FT.main(ft_args(env["dir"], tmp_path / precision, precision=precision)) == 0
        low = read_features(tmp_path / precision / "txt.jsonl", "query_id").data
        np.testing.assert_allclose(low, full, atol=6e-2)
        assert not np.array_equal(low, full)


def test_extraction_prints_its_precision_and_help_says_what_the_releases_amp_was(
    env, tmp_path, capsys
):
    from eval.extraction import PRECISION_NOTES, describe_precision

    assert FT.main(ft_args(env["dir"], tmp_path / "a")) == 0
    out = capsys.readouterr().out
    assert "extraction precision: fp32 on cpu: fp32 weights and activations" in out
    assert "default --precision amp (fp32 weights, no autocast)" in out
    # amp on a GPU is fp16 autocast here: the line says it is not the release's amp
    line = describe_precision("amp", torch.device("cuda", 0))
    assert line.startswith("extraction precision: amp on cuda:0: fp32 weights, fp16 autocast")
    assert "NOT the release's --precision amp" in line
    assert set(PRECISION_NOTES) == {"fp32", "amp", "fp16", "bf16", "amp_bf16"}
    for script in (FT, ZS):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert (
            "what the release's extraction scripts ran with their default --precision amp" in text
        )
        assert "which gives fp16 features" in text


def test_finetuned_extraction_reads_the_model_from_the_checkpoint(env, tmp_path, capsys):
    """Without --model, extract_features.py builds the config the training checkpoint records; a
    checkpoint that records none is an error asking for --model. --eval-batch-size sets both batches."""
    d = env["dir"]
    ckpt = torch.load(d / "epoch_2.pt", weights_only=True)
    named = tmp_path / "named.pt"
    torch.save(dict(ckpt, model="tiny"), named)
    args = [
        a
        for a in ft_args(d, tmp_path, resume=named)
        if not a.startswith(("--model", "--img-", "--text-b"))
    ]
    assert FT.main(args + ["--eval-batch-size=2"]) == 0
    assert "--model tiny (recorded in" in capsys.readouterr().out
    with_model = tmp_path / "with_model"
    with_model.mkdir()
    assert FT.main(ft_args(d, with_model)) == 0
    for name in ("img.jsonl", "txt.jsonl"):
        a = read_features(tmp_path / name, "image_id" if name == "img.jsonl" else "query_id")
        b = read_features(with_model / name, "image_id" if name == "img.jsonl" else "query_id")
        assert a.ids == b.ids
        np.testing.assert_allclose(a.data, b.data, atol=1e-6)
    bare = [a for a in ft_args(d, tmp_path / "x") if not a.startswith("--model")]
    with pytest.raises(InputError, match="records no model config; pass --model"):
        FT.main(bare)
