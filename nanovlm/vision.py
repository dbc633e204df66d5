"""The vision transformers a VLM sees with: CLIP's, which LLaVA uses, and DINOv2's, which SPHINX adds.

Both are pre-LN ViTs (Dosovitskiy et al., 2021): a conv cuts the image into patches, a learned class token and
learned positions are added, then identical blocks x = x + attn(ln1(x)); x = x + mlp(ln2(x)). The families
differ only in these places (`VisionConfig.family`):

| | CLIP (Radford et al., 2021) | DINOv2 (Oquab et al., 2024) |
|---|---|---|
| patch conv | no bias | bias |
| before the blocks | `pre_layrnorm` (spelled so in the checkpoints) | nothing |
| residual branches | added as they are | scaled by a learned vector first (LayerScale): x + lambda * f(x) |
| activation, layer-norm eps | quick_gelu (x * sigmoid(1.702 x)), 1e-5 | exact gelu, 1e-6 |
| mask token | none | a learned token for masked-image training: loaded, never used here |
| pixel statistics | CLIP's mean and std | ImageNet's |

Positions are learned on the pretraining grid (CLIP ViT-L/14-336: 24x24; DINOv2: 37x37, at 518 px) and
resized bicubically (align_corners=False, in float32) to the grid of the image at hand, with the class token's
position kept as is. This is what transformers 5 does for both (checked against 5.24's
Dinov2Embeddings.interpolate_pos_encoding, which asks F.interpolate for the target size). DINOv2's own code
(interpolate_offset=0.1) and older transformers releases pass a scale factor, (grid + 0.1) / side, instead,
which samples slightly different points: features at non-native sizes differ from theirs by a little.

A LLaVA-style VLM reads the hidden state of one layer, counted as transformers' `hidden_states` are (0: the
embeddings, i: after block i; LLaVA takes -2, the penultimate), drops the class token or keeps it, and by
default applies no final norm, so the layers after the selected one are not run at all. SPHINX instead takes
the last layer through the final layer norm (CLIP's `post_layernorm`, DINOv2's `layernorm`): `select_norm`.

Module names follow CLIP's Hugging Face checkpoints (`vision_model.` stripped, `encoder.layers` ->
`layers`); DINOv2 checkpoints map onto the same names by their own fixed rename (the end of this file).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_renamed, read_config, resolve
from .image import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}
FAMILIES = ("clip", "dinov2")


@dataclass
class VisionConfig:
    family: str = "clip"  # "clip" or "dinov2": where the two differ (module docstring)
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336  # the pretraining resolution: the learned positions are this grid's
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # index into the hidden states (embeddings, layer 1, ..., layer L) as LLaVA counts
    select_feature: str = "patch"  # "patch" drops the class token, "cls_patch" keeps it
    select_norm: bool = False  # apply the final layer norm to the selected layer (SPHINX does, LLaVA does not)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown vision family {self.family!r}; supported: {FAMILIES}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")
        if not -self.num_hidden_layers - 1 <= self.select_layer <= self.num_hidden_layers:
            raise ValueError(f"select_layer {self.select_layer} out of range for {self.num_hidden_layers} layers")
        if self.family == "dinov2" and self.intermediate_size % self.hidden_size:
            raise ValueError("a DINOv2 MLP is a whole multiple (mlp_ratio) of the hidden size")

    @property
    def layers_to_run(self) -> int:
        return self.select_layer % (self.num_hidden_layers + 1)

    @property
    def pixel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) per RGB channel the tower was pretrained with."""
        return (CLIP_MEAN, CLIP_STD) if self.family == "clip" else (IMAGENET_MEAN, IMAGENET_STD)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid (rows, columns) of a height x width image."""
        return height // self.patch_size, width // self.patch_size

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "VisionConfig":
        """From a CLIPConfig (`vision_config` inside), a CLIPVisionConfig, a Dinov2Config, or a llava-hf
        `vision_config`. Missing keys take transformers' defaults of the family, because llava-hf configs rely
        on them."""
        if hf.get("model_type") == "clip":
            hf = hf.get("vision_config", {})
        model_type = hf.get("model_type", "clip_vision_model")
        if model_type == "clip_vision_model":
            defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
            return cls(**{k: hf.get(k, v) for k, v in defaults.items()} | overrides)
        if model_type == "dinov2":
            # dinov2-giant's SwiGLU blocks, and configs without qkv biases or mask token, are other layouts
            if hf.get("use_swiglu_ffn", False) or not hf.get("qkv_bias", True) or not hf.get("use_mask_token", True):
                raise ValueError("unsupported DINOv2 variant: only MLP blocks with qkv biases and a mask token "
                                 "(dinov2-small, -base, -large) are supported")
            defaults = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                            patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6)
            fields = {k: hf.get(k, v) for k, v in defaults.items()}
            fields["intermediate_size"] = int(fields["hidden_size"] * hf.get("mlp_ratio", 4))
            return cls(family="dinov2", **fields | overrides)
        raise ValueError(f"unsupported vision model_type {model_type!r}; supported: clip_vision_model, dinov2")

    def to_hf(self) -> dict:
        hf = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                  num_attention_heads=self.num_attention_heads, image_size=self.image_size,
                  patch_size=self.patch_size, hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
                  num_channels=3)
        if self.family == "dinov2":
            return hf | {"model_type": "dinov2", "mlp_ratio": self.intermediate_size // self.hidden_size}
        return hf | {"model_type": "clip_vision_model", "intermediate_size": self.intermediate_size}


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # images, tokens (class token + patches), hidden
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, C / n_head)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, n_head, T, C / n_head); every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DINOv2's learned per-channel scale of a residual branch (Touvron et al., CaiT, 2021): lambda * x."""

    def __init__(self, dim: int):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        scaled = cfg.family == "dinov2"
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_scale1 = LayerScale(cfg.hidden_size) if scaled else nn.Identity()
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_scale2 = LayerScale(cfg.hidden_size) if scaled else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.self_attn(self.layer_norm1(x)))
        return x + self.layer_scale2(self.mlp(self.layer_norm2(x)))


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=cfg.family == "dinov2")
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)
        # DINOv2's token for masked patches in its own pretraining; kept so that its checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.hidden_size)) if cfg.family == "dinov2" else None

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Learned positions, bicubically resized (in float32) when the patch grid differs from the checkpoint's."""
        pos = self.position_embedding.weight
        side = math.isqrt(pos.shape[0] - 1)
        if (grid_h, grid_w) == (side, side):
            return pos
        grid = pos[1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # (gh * gw, D)
        return torch.cat([pos[:1], grid])  # (1 + gh * gw, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, H / p, W / p)
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (N, grid_h * grid_w, D), row by row
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (N, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embeddings(grid_h, grid_w)  # (N, 1 + patches, D)


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.family == "clip"
                             else nn.Identity())  # DINOv2 has no norm before its blocks
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        # CLIP's post_layernorm, DINOv2's layernorm: used only with select_norm, always kept so that checkpoints
        # load strictly and round-trip unchanged.
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised pixels -> (N, tokens, hidden) features of the selected layer."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (N, 1 + patches, hidden)
        for block in self.layers[: self.cfg.layers_to_run]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.cfg.select_norm:
            x = self.post_layernorm(x)
        return x[:, 1:] if self.cfg.select_feature == "patch" else x  # "patch" drops the class token

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **overrides) -> "VisionTower":
        """A CLIPModel / CLIPVisionModel checkpoint (the text tower is ignored) or a Dinov2Model one.
        overrides: VisionConfig fields such as select_layer, select_feature, select_norm."""
        path = resolve(name_or_path, revision)
        with torch.device("meta"):
            model = cls(VisionConfig.from_hf(read_config(path), **overrides))
        if model.cfg.family == "clip":
            load_renamed(model, path, CLIP_RENAMES, dtype, device)
        else:
            load_renamed(model, path, dinov2_renames(model.cfg.num_hidden_layers), dtype, device,
                         reshape=DINOV2_RESHAPED)
        return model


# Checkpoint prefix -> module prefix, first match wins.
CLIP_RENAMES = [("vision_model.encoder.layers.", "layers."), ("vision_model.", "")]
DINOV2_BLOCK = [("attention.attention.query.", "self_attn.q_proj."), ("attention.attention.key.", "self_attn.k_proj."),
                ("attention.attention.value.", "self_attn.v_proj."), ("attention.output.dense.", "self_attn.out_proj."),
                ("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("layer_scale1.", "layer_scale1."),
                ("layer_scale2.", "layer_scale2."), ("mlp.", "mlp.")]
# DINOv2 stores these two with leading unit dimensions, (1, 1, D) and (1, positions, D); the tower keeps CLIP's.
DINOV2_RESHAPED = ("embeddings.class_embedding", "embeddings.position_embedding.weight")


def dinov2_renames(num_layers: int) -> list[tuple[str, str]]:
    """A Dinov2Model checkpoint's names (facebook/dinov2-*) -> the tower's, which are CLIP's."""
    return [("embeddings.cls_token", "embeddings.class_embedding"),
            ("embeddings.position_embeddings", "embeddings.position_embedding.weight"),
            ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
            ("embeddings.mask_token", "embeddings.mask_token"),
            ("layernorm.", "post_layernorm."),
            *[(f"encoder.layer.{i}.{old}", f"layers.{i}.{new}")
              for i in range(num_layers) for old, new in DINOV2_BLOCK]]
