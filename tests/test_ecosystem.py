"""Cross-checks with the CLIP ecosystem: evaluation.py's recalls equal CLIP_benchmark's retrieval metric on
the same similarity scores, and a fine-tuned checkpoint exported by scripts/export_weights.py loads in
OpenCLIP (`create_model_and_transforms(..., pretrained=PATH)`) with the project's features."""

import json
import sys

import numpy as np
import pytest
import torch
from _scripts import load_script

from clip.clip import create_model, tokenize
from eval.feature_io import Features, read_features, write_features
from training import checkpoint as C

evaluation = load_script("eval/evaluation.py")
make_topk = load_script("eval/make_topk_predictions.py")
export = load_script("scripts/export_weights.py")


class _FixedFeatures(torch.nn.Module):
    """A 'model' for CLIP_benchmark whose embeddings are given: images and texts are row indices."""

    def __init__(self, images: np.ndarray, texts: np.ndarray):
        super().__init__()
        self.images, self.texts = torch.from_numpy(images), torch.from_numpy(texts)

    def encode_image(self, index):
        return self.images[index]

    def encode_text(self, index):
        return self.texts[index]


def test_evaluation_recalls_equal_clip_benchmarks_retrieval_metric(tmp_path):
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    rng = np.random.default_rng(0)
    n, caps, dim = 40, 5, 8  # a low dimension: the recalls are far from 0 and 100
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    image_ids = [f"img{i}" for i in range(n)]
    centres = rng.normal(size=(n, dim))
    images = unit(centres + 0.8 * rng.normal(size=(n, dim)))
    texts = unit(np.repeat(centres, caps, axis=0) + 0.8 * rng.normal(size=(n * caps, dim)))
    paths = {k: tmp_path / f"{k}.jsonl" for k in ("img", "txt", "i2t", "t2i", "gt_t", "gt_i")}
    write_features(paths["img"], Features(paths["img"], "image_id", image_ids, images))
    write_features(paths["txt"], Features(paths["txt"], "query_id", list(range(n * caps)), texts))
    with open(paths["gt_t"], "w") as f:
        for q in range(n * caps):
            f.write(json.dumps({"query_id": q, "item_ids": [image_ids[q // caps]]}) + "\n")
    with open(paths["gt_i"], "w") as f:
        for i, image in enumerate(image_ids):
            f.write(
                json.dumps({"image_id": image, "item_ids": list(range(i * caps, i * caps + caps))})
                + "\n"
            )
    make_topk.main(
        [
            f"--image-feats={paths['img']}",
            f"--text-feats={paths['txt']}",
            "--top-k=10",
            f"--output-images={paths['i2t']}",
            f"--output-texts={paths['t2i']}",
        ]
    )
    ours = {}
    for direction, gt, pred, key in (
        ("t2i", "gt_t", "t2i", "query_id"),
        ("i2t", "gt_i", "i2t", "image_id"),
    ):
        out = tmp_path / f"score_{direction}.json"
        evaluation.main([str(paths[gt]), str(paths[pred]), str(out), key])
        ours[direction] = json.loads(out.read_text())["scoreJson"]

    # CLIP_benchmark's evaluate() on the very features the prediction files were made from
    image_feats = read_features(paths["img"], "image_id").data
    text_feats = read_features(paths["txt"], "query_id").data
    model = _FixedFeatures(image_feats, text_feats)
    loader = [
        (
            torch.arange(s, min(s + 16, n)),
            [[q for q in range(i * caps, i * caps + caps)] for i in range(s, min(s + 16, n))],
        )
        for s in range(0, n, 16)
    ]
    theirs = zr.evaluate(model, loader, torch.tensor, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (
        1,
        5,
        10,
    ):  # theirs is a float32 mean: equal to 1e-4 percent (one query is 0.5 or 2.5)
        assert ours["t2i"][f"r{k}"] == pytest.approx(
            100 * theirs[f"image_retrieval_recall@{k}"], abs=1e-4
        )
        assert ours["i2t"][f"r{k}"] == pytest.approx(
            100 * theirs[f"text_retrieval_recall@{k}"], abs=1e-4
        )
    assert 5 < ours["t2i"]["r1"] < 95 and 5 < ours["i2t"]["r1"] < 95  # the check has teeth


def test_an_exported_fine_tuned_checkpoint_loads_in_openclip_with_the_same_features(
    tmp_path, monkeypatch
):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = create_model("ViT-B-32").eval()  # OpenAI's configuration: QuickGELU
    # a checkpoint as fine-tuning writes it (DDP's "module." prefix, optimiser state and all)
    ckpt = tmp_path / "epoch_2.pt"
    C.save_checkpoint(
        {
            "epoch": 2,
            "step": 10,
            "name": "run",
            "model": "ViT-B-32",
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
        },
        ckpt,
    )
    exported = tmp_path / "agree-vit-b-32.pt"
    monkeypatch.setattr(sys, "argv", ["export_weights.py", str(ckpt), str(exported)])
    assert export.main() == 0
    theirs, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32-quickgelu", pretrained=str(exported)
    )
    theirs.eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    captions = ["a dog chasing a red ball", "two people on a bench"]
    tokens = open_clip.get_tokenizer("ViT-B-32-quickgelu")(captions)
    assert torch.equal(tokens, tokenize(captions))
    with torch.no_grad():
        for ours_f, theirs_f in (
            (model.encode_image(images), theirs.encode_image(images)),
            (model.encode_text(tokens), theirs.encode_text(tokens)),
        ):
            assert (ours_f - theirs_f).abs().max().item() < 1e-5
            assert ours_f.abs().max().item() > 0.1
        assert theirs.logit_scale.item() == pytest.approx(model.logit_scale.item())
