"""CLIP: modified-ResNet or ViT image tower, causal text transformer, OpenAI parameter names."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's; fp64 stays fp64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers inside `module` compute as usual, but what they add to their running statistics is dropped.

    For passes that repeat a forward already counted: checkpoint recomputation, feature caching. The layers
    update throw-away copies of their statistics buffers (the same ops run, so the same tensors are saved).
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [{n: getattr(m, n) for n in names} for m in norms]
    for m, buffers in zip(norms, kept):
        for n, t in buffers.items():
            setattr(m, n, t.clone() if t is not None else None)
    try:
        yield
    finally:
        for m, buffers in zip(norms, kept):
            for n, t in buffers.items():
                setattr(m, n, t)


def uses_batch_statistics(module: nn.Module) -> bool:
    """True when a BatchNorm layer inside `module` normalises with the statistics of its input batch
    (train mode, or no running statistics): then what else is in the batch changes each row's output."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in module.modules()
    )


def _checkpointed(fn: nn.Module, *args: Optional[torch.Tensor]) -> torch.Tensor:
    """fn(*args), its activations recomputed in the backward pass (non-reentrant; BN statistics counted once)."""
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), frozen_bn_stats(fn)),
    )


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation OpenAI's towers were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP activation of the transformer blocks (both towers), a config entry: OpenAI trained with
# QuickGELU; OpenCLIP's models without "-quickgelu" in their name (e.g. its LAION-2B ViT-B-32) use exact GELU.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


def activation_layer(name: str) -> nn.Module:
    """A new activation module for config name `name` ('quick_gelu' or 'gelu')."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


# ---------------------------------------------------------------------------
# Modified ResNet image tower
class Bottleneck(nn.Module):
    """ResNet bottleneck; strided blocks downsample with an average pool (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        (
                            "0",
                            nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False),
                        ),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean of the feature map queries all positions."""

    def __init__(
        self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None
    ):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # B, HW, C
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        b, n, c = tokens.shape
        h = self.num_heads
        q = self.q_proj(tokens[:, :1]).view(b, 1, h, c // h).transpose(1, 2)
        k = self.k_proj(tokens).view(b, n, h, c // h).transpose(1, 2)
        v = self.v_proj(tokens).view(b, n, h, c // h).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v)  # B, h, 1, C/h
        return self.c_proj(pooled.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, anti-aliased strides and an attention-pool head."""

    def __init__(
        self,
        layers: Sequence[int],
        output_dim: int,
        heads: int,
        input_resolution: int = 224,
        width: int = 64,
    ):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        self.attnpool = AttentionPool2d(input_resolution // 32, embed_dim, heads, output_dim)
        self.grad_checkpointing = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = (
                _checkpointed(stage, x)
                if self.grad_checkpointing and torch.is_grad_enabled()
                else stage(x)
            )
        return self.attnpool(x)


# ---------------------------------------------------------------------------
# Transformers
class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, d_model: int, n_head: int, activation: str = "quick_gelu"):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", activation_layer(activation)),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.ln_1(x)
        mask = None if attn_mask is None else attn_mask.to(dtype=h.dtype, device=h.device)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks over (batch, tokens, width) inputs."""

    def __init__(self, width: int, layers: int, heads: int, activation: str = "quick_gelu"):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, activation) for _ in range(layers)]
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.resblocks:
            x = _checkpointed(block, x, attn_mask) if checkpointed else block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """ViT image tower: patches + class token, pre-LN, class token projected out."""

    def __init__(
        self,
        input_resolution: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        activation: str = "quick_gelu",
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype))  # B, W, g, g
        x = x.flatten(2).transpose(1, 2)  # B, g*g, W
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


# ---------------------------------------------------------------------------
class CLIP(nn.Module):
    """Contrastive image-text model with OpenAI's parameter layout."""

    def __init__(
        self,
        embed_dim: int,
        image_resolution: int,
        vision_layers: Union[int, Sequence[int]],
        vision_width: int,
        vision_patch_size: Optional[int],
        context_length: int,
        vocab_size: int,
        transformer_width: int,
        transformer_heads: int,
        transformer_layers: int,
        activation: str = "quick_gelu",
    ):
        super().__init__()
        self.context_length = context_length
        self.activation = activation
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(
                vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width
            )
        else:
            self.visual = VisionTransformer(
                image_resolution,
                vision_patch_size,
                vision_width,
                vision_layers,
                vision_width // 64 or 1,
                embed_dim,
                activation,
            )
        self.transformer = Transformer(
            transformer_width, transformer_layers, transformer_heads, activation
        )
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        # causal mask: position i attends to positions <= i
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Random initialisation as in CLIP's paper code (normal with width-scaled std)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for stage in (
                self.visual.layer1,
                self.visual.layer2,
                self.visual.layer3,
                self.visual.layer4,
            ):
                for block in stage:
                    nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the image tower's first convolution (fp16 after convert_weights)."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Unnormalised image embeddings, (B, embed_dim).

        `groups` > 1: the batch is `groups` equal consecutive parts, each encoded by its own call of the
        image tower, in order; for a tower with BatchNorm in train mode each part then gets its own batch
        statistics (and adds them to the running statistics in turn), as separate calls would.
        """
        image = image.to(self.dtype)
        if groups == 1:
            return self.visual(image)
        if groups < 1 or image.shape[0] % groups:
            raise ValueError(f"cannot cut a batch of {image.shape[0]} images into {groups} groups")
        return torch.cat([self.visual(part) for part in image.split(image.shape[0] // groups)])

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings taken at each sequence's end-of-text token, (B, embed_dim)."""
        eot = text.argmax(dim=-1)  # the end token has the largest id in the vocabulary
        if not torch.jit.is_tracing() and text.shape[0] > 0:
            # Under the causal mask nothing after a sequence's end token reaches its output, so the
            # batch is cut to its longest sequence: same features, ~5x less work for captions.
            text = text[:, : int(eot.max()) + 1]
        n = text.shape[1]
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[:n].to(self.dtype)
        x = self.ln_final(self.transformer(x, self.attn_mask[:n, :n]))
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection.to(x.dtype)

    def forward(
        self, image: Optional[torch.Tensor], text: Optional[torch.Tensor], image_groups: int = 1
    ):
        """Both sides: (normalised image features, normalised text features, logit_scale.exp()).

        With `text=None` (`image=None`) return the unnormalised image (text) embeddings.
        `image_groups`: see encode_image's `groups`.
        """
        if text is None:
            return self.encode_image(image, image_groups)
        if image is None:
            return self.encode_text(text)
        image_features = F.normalize(self.encode_image(image, image_groups), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

    # ----------------------------------------------------------------- memory levers for fine-tuning
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Both towers keep only each transformer block's (ResNet stage's) input and recompute the rest in backward."""
        self.transformer.grad_checkpointing = enable
        tower = (
            self.visual.transformer if isinstance(self.visual, VisionTransformer) else self.visual
        )
        tower.grad_checkpointing = enable

    def layer_groups(self, tower: str) -> list[list[nn.Parameter]]:
        """The parameters of the 'image' or 'text' tower in groups, input to output.

        Groups: the stem (patch/token and position embeddings, first norm; the ResNet's conv stem), one
        group per transformer block (ResNet stage), and the head (final norm and projection; attention pool).
        """
        if tower == "text":
            stem = [self.token_embedding.weight, self.positional_embedding]
            blocks = [list(b.parameters()) for b in self.transformer.resblocks]
            head = [*self.ln_final.parameters(), self.text_projection]
        elif tower == "image" and isinstance(self.visual, VisionTransformer):
            v = self.visual
            stem = [
                v.conv1.weight,
                v.class_embedding,
                v.positional_embedding,
                *v.ln_pre.parameters(),
            ]
            blocks = [list(b.parameters()) for b in v.transformer.resblocks]
            head = [*v.ln_post.parameters(), v.proj]
        elif tower == "image":
            v = self.visual
            stem = [
                p for m in (v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3) for p in m.parameters()
            ]
            blocks = [list(s.parameters()) for s in (v.layer1, v.layer2, v.layer3, v.layer4)]
            head = list(v.attnpool.parameters())
        else:
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        return [stem, *blocks, head]

    def _lock(self, tower: str, unlocked_groups: int) -> None:
        groups = self.layer_groups(tower)
        if not 0 <= unlocked_groups < len(groups):
            raise ValueError(
                f"{tower} tower: unlocked_groups must be in [0, {len(groups) - 1}], got {unlocked_groups}"
            )
        for group in groups[: len(groups) - unlocked_groups]:
            for p in group:
                p.requires_grad_(False)
        self.train(self.training)  # frozen BatchNorm layers switch to eval mode

    def lock_image_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the image tower except its last `unlocked_groups` layer groups (see layer_groups)."""
        self._lock("image", unlocked_groups)

    def lock_text_tower(self, unlocked_groups: int = 0) -> None:
        """Freeze the text tower except its last `unlocked_groups` layer groups (see layer_groups)."""
        self._lock("text", unlocked_groups)

    def train(self, mode: bool = True) -> "CLIP":
        """As nn.Module.train, but BatchNorm layers with frozen parameters (a locked tower) stay in eval mode."""
        super().train(mode)
        for m in self.modules():
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.weight is not None
                and not m.weight.requires_grad
            ):
                m.eval()
        return self


def convert_weights(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Cast the weights of linear, conv and attention layers and the projections to `dtype` (fp16), in place."""

    def _to_low(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
        if isinstance(module, nn.MultiheadAttention):
            for name in (
                "in_proj_weight",
                "q_proj_weight",
                "k_proj_weight",
                "v_proj_weight",
                "in_proj_bias",
                "bias_k",
                "bias_v",
            ):
                tensor = getattr(module, name, None)
                if tensor is not None:
                    tensor.data = tensor.data.to(dtype)
        for name in ("text_projection", "proj"):
            tensor = getattr(module, name, None)
            if isinstance(tensor, nn.Parameter):
                tensor.data = tensor.data.to(dtype)

    model.apply(_to_low)


def _count_blocks(state_dict: dict, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})


def config_from_state_dict(state_dict: dict) -> dict:
    """Infer the CLIP constructor arguments from an OpenAI-layout state dict."""
    if "visual.proj" in state_dict:  # ViT
        vision_width = state_dict["visual.conv1.weight"].shape[0]
        vision_layers = _count_blocks(state_dict, "visual.transformer.resblocks.")
        vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
        grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        image_resolution = vision_patch_size * grid
    else:  # modified ResNet
        vision_layers = [_count_blocks(state_dict, f"visual.layer{i}.") for i in (1, 2, 3, 4)]
        vision_width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_patch_size = None
        image_resolution = grid * 32
    transformer_width = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=image_resolution,
        vision_layers=vision_layers,
        vision_width=vision_width,
        vision_patch_size=vision_patch_size,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=transformer_width,
        transformer_heads=max(transformer_width // 64, 1),
        transformer_layers=_count_blocks(state_dict, "transformer.resblocks."),
    )


def build_model(state_dict: dict, config: Optional[dict] = None) -> CLIP:
    """Build a CLIP of `config` and load `state_dict` strictly (fp32, eval mode).

    Without `config` the architecture is inferred from the weights, with QuickGELU (OpenAI's activation;
    the weights cannot tell it from GELU).
    """
    # OpenAI archives carry three scalar entries; TorchScript state dicts also hold the causal mask buffer
    extras = ("input_resolution", "context_length", "vocab_size", "attn_mask")
    state_dict = {k: v for k, v in state_dict.items() if k not in extras}
    model = CLIP(**(config if config is not None else config_from_state_dict(state_dict)))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()
