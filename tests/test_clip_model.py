"""Our CLIP against OpenCLIP's OpenAI-style towers, and the model's call semantics."""

import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clip.clip import LoadError, create_model, model_config, model_from_state_dict, tokenize  # noqa: E402
from clip.model import CLIP, QuickGELU, build_model, config_from_state_dict, convert_weights  # noqa: E402


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter and BN statistic random values, so no path is a no-op (e.g. zero-init bn3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.is_floating_point():
                continue
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("logit_scale"):
                p.fill_(2.0)
            else:
                p.copy_(p + torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize(
    "peer_name,ours_name,resolution",
    [
        (
            "ViT-B-32-quickgelu",
            None,
            224,
        ),  # architecture inferred from the weights, QuickGELU by default
        ("RN50-quickgelu", None, 224),
        ("ViT-B-32", "ViT-B-32-gelu", 224),  # OpenCLIP's GELU ViT-B/32 (e.g. its LAION-2B weights)
    ],
)
def test_parity_with_openclip(peer_name, ours_name, resolution):
    torch.manual_seed(0)
    peer = open_clip.create_model(peer_name, pretrained=None)
    _randomise(peer, seed=1)
    peer.eval()
    # strict=True inside; a named config brings its activation, which the weights cannot tell
    ours = (
        model_from_state_dict(peer.state_dict(), peer_name, ours_name)
        if ours_name
        else build_model(peer.state_dict())
    )
    assert isinstance(ours, CLIP)
    images = torch.randn(3, 3, resolution, resolution, generator=torch.Generator().manual_seed(2))
    texts = [
        "a photo of a dog",
        "",
        "two small red circles left of a blue star, on a grey background",
    ]
    tokens = tokenize(texts)
    assert torch.equal(tokens, open_clip.tokenize(texts))
    with torch.no_grad():
        img_diff = (ours.encode_image(images) - peer.encode_image(images)).abs().max().item()
        txt_diff = (ours.encode_text(tokens) - peer.encode_text(tokens)).abs().max().item()
    assert img_diff <= 1e-5, img_diff
    assert txt_diff <= 1e-5, txt_diff


def test_forward_semantics():
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    images = torch.randn(4, 3, 64, 64)
    tokens = tokenize(["a red circle", "a blue star", "[MASK]", ""])
    with torch.no_grad():
        img, txt, scale = model(images, tokens)
        raw_img = model(images, None)
        raw_txt = model(None, tokens)
    assert img.shape == (4, 128) and txt.shape == (4, 128)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(raw_img, model.encode_image(images))
    torch.testing.assert_close(raw_txt, model.encode_text(tokens))
    assert not torch.allclose(raw_img.norm(dim=-1), torch.ones(4))  # unnormalised
    torch.testing.assert_close(img, raw_img / raw_img.norm(dim=-1, keepdim=True))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_text_features_do_not_depend_on_batch_length():
    """encode_text cuts a batch to its longest sequence; a short text must come out the same
    whether it is alone (cut to a few tokens) or beside a full-length text (no cut)."""
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    short = tokenize(["a red circle"])
    long_ = tokenize(["red circle " * 60])
    assert int(long_.argmax()) == 76
    with torch.no_grad():
        alone = model.encode_text(short)
        beside = model.encode_text(torch.cat([short, long_]))[:1]
        noisy = short.clone()
        noisy[0, int(short.argmax()) + 1 :] = 1234  # garbage after the end token
        with_noise = model.encode_text(torch.cat([noisy, long_]))[:1]
    torch.testing.assert_close(alone, beside, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, with_noise, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-rn", "ViT-B-32", "RN50"])
def test_build_model_infers_config(name):
    cfg = model_config(name)
    model = CLIP(**cfg)
    inferred = config_from_state_dict(model.state_dict())
    if isinstance(cfg["vision_layers"], list):
        inferred["vision_layers"] = list(inferred["vision_layers"])
    assert inferred == {
        k: v for k, v in cfg.items() if k != "activation"
    }  # weights cannot tell the activation
    assert cfg["activation"] == "quick_gelu"


# Our name -> OpenCLIP's name for the same model: OpenCLIP's plain names are GELU, its "-quickgelu" names OpenAI's.
OPENCLIP_NAMES = {
    "ViT-B-32": "ViT-B-32-quickgelu",
    "ViT-L-14": "ViT-L-14-quickgelu",
    "RN50": "RN50-quickgelu",
    "ViT-B-32-gelu": "ViT-B-32",
    "ViT-L-14-gelu": "ViT-L-14",
    "RN50-gelu": "RN50",
}


@pytest.mark.parametrize("ours,theirs", sorted(OPENCLIP_NAMES.items()))
def test_configs_match_openclip_names(ours, theirs):
    cfg, peer = model_config(ours), open_clip.get_model_config(theirs)
    vision, text = peer["vision_cfg"], peer["text_cfg"]
    assert cfg["activation"] == ("quick_gelu" if peer.get("quick_gelu") else "gelu")
    assert (
        cfg["embed_dim"],
        cfg["image_resolution"],
        cfg["vision_layers"],
        cfg["vision_width"],
        cfg["vision_patch_size"],
    ) == (
        peer["embed_dim"],
        vision["image_size"],
        vision["layers"],
        vision["width"],
        vision["patch_size"],
    )
    assert (
        cfg["context_length"],
        cfg["vocab_size"],
        cfg["transformer_width"],
        cfg["transformer_heads"],
        cfg["transformer_layers"],
    ) == (text["context_length"], text["vocab_size"], text["width"], text["heads"], text["layers"])


def test_activation_is_part_of_the_config():
    torch.manual_seed(0)
    quick = create_model("tiny")
    gelu = CLIP(**{**model_config("tiny"), "activation": "gelu"})
    gelu.load_state_dict(quick.state_dict())  # same weights, same names
    for model, kind in ((quick, QuickGELU), (gelu, torch.nn.GELU)):
        assert isinstance(model.transformer.resblocks[0].mlp.gelu, kind)
        assert isinstance(model.visual.transformer.resblocks[-1].mlp.gelu, kind)
    tokens = tokenize(["a red circle"])
    with torch.no_grad():
        assert not torch.allclose(quick.encode_text(tokens), gelu.encode_text(tokens), atol=1e-4)
    sd = quick.state_dict()
    assert isinstance(
        model_from_state_dict(sd, "x.pt").transformer.resblocks[0].mlp.gelu, QuickGELU
    )
    named = model_from_state_dict(sd, "x.pt", "tiny-gelu")  # a config name chooses the activation
    assert isinstance(named.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    with pytest.raises(
        LoadError, match=r"x.pt: weights are not a ViT-L-14-gelu model \(embed_dim 128 != 768"
    ):
        model_from_state_dict(sd, "x.pt", "ViT-L/14-gelu")
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        CLIP(**{**model_config("tiny"), "activation": "relu6"})


def test_model_names_accept_both_spellings():
    assert model_config("ViT-B/32") == model_config("ViT-B-32")
    assert model_config("ViT-L/14")["vision_width"] == 1024


def test_convert_weights_to_fp16():
    model = create_model("tiny")
    convert_weights(model)
    assert model.dtype == torch.float16
    assert model.text_projection.dtype == torch.float16
    assert model.visual.proj.dtype == torch.float16
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16
    assert model.ln_final.weight.dtype == torch.float32  # LayerNorm stays fp32 (as OpenAI's)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "amp"])
def test_cuda_precisions_match_fp32(precision):
    torch.manual_seed(0)
    ref = create_model("tiny").eval()
    model = copy.deepcopy(ref).cuda()
    if precision == "fp16":
        convert_weights(model)
    images = torch.randn(4, 3, 64, 64)
    tokens = tokenize(["a red circle", "a blue star", "x", ""])
    with torch.no_grad(), torch.autocast("cuda", enabled=precision == "amp"):
        img, txt, _ = model(images.cuda(), tokens.cuda())
    with torch.no_grad():
        rimg, rtxt, _ = ref(images, tokens)
    assert (img.float().cpu() - rimg).abs().max() < 2e-2
    assert (txt.float().cpu() - rtxt).abs().max() < 2e-2
