"""The CLIP vision transformer that LLaVA uses as its eye.

A pre-LN ViT (Radford et al., 2021): a bias-free conv cuts the image into patches, a learned class token and
position embedding are added, `pre_layrnorm` (spelled so in the checkpoints) normalises, then identical blocks
x = x + attn(ln1(x)); x = x + mlp(ln2(x)) with quick_gelu. LLaVA reads the hidden state of one layer (the
penultimate by default), drops the class token, and never applies `post_layernorm`, so layers after the
selected one are not run at all.

Module names follow the Hugging Face checkpoints (`vision_model.` stripped, `encoder.layers` -> `layers`), so
every checkpoint key maps to a parameter here by a fixed rename.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_renamed, read_config, resolve

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # index into the hidden states (embeddings, layer 1, ..., layer L) as LLaVA counts
    select_feature: str = "patch"  # "patch" drops the class token, "cls_patch" keeps it

    def __post_init__(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {self.select_feature!r}")
        if not -self.num_hidden_layers - 1 <= self.select_layer <= self.num_hidden_layers:
            raise ValueError(f"select_layer {self.select_layer} out of range for {self.num_hidden_layers} layers")

    @property
    def layers_to_run(self) -> int:
        return self.select_layer % (self.num_hidden_layers + 1)

    def num_image_tokens(self, image_size: int | None = None) -> int:
        side = (image_size or self.image_size) // self.patch_size
        return side * side + (self.select_feature == "cls_patch")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "VisionConfig":
        """From a CLIPConfig (`vision_config` inside), a CLIPVisionConfig, or a llava-hf `vision_config`.

        Missing keys take transformers' CLIPVisionConfig defaults, because llava-hf configs rely on them.
        """
        if hf.get("model_type") == "clip":
            hf = hf.get("vision_config", {})
        if hf.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"unsupported vision model_type {hf['model_type']!r}; only CLIP vision towers are")
        defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        fields = {k: hf.get(k, v) for k, v in defaults.items()}
        return cls(**fields | overrides)

    def to_hf(self) -> dict:
        hf = {k: v for k, v in asdict(self).items() if k not in ("select_layer", "select_feature")}
        return hf | {"model_type": "clip_vision_model", "num_channels": 3}


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


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Learned positions, bicubically resized when the patch grid differs from the checkpoint's."""
        pos = self.position_embedding.weight
        side = math.isqrt(pos.shape[0] - 1)
        if (grid_h, grid_w) == (side, side):
            return pos
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)  # (1, D, gh, gw)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])  # (1 + gh * gw, D)

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
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        # Unused by LLaVA; kept so that checkpoints load strictly and round-trip unchanged.
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
        return x[:, 1:] if self.cfg.select_feature == "patch" else x  # "patch" drops the class token

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **overrides) -> "VisionTower":
        """The vision half of a CLIPModel / CLIPVisionModel checkpoint (the text tower is ignored).
        overrides: VisionConfig fields such as select_layer, select_feature."""
        path = resolve(name_or_path, revision)
        with torch.device("meta"):
            model = cls(VisionConfig.from_hf(read_config(path), **overrides))
        load_renamed(model, path, CLIP_RENAMES, dtype, device)
        return model


CLIP_RENAMES = [("vision_model.encoder.layers.", "layers."), ("vision_model.", "")]  # checkpoint -> module
