"""The vision-language model: vision tower -> projector -> LLM, as in LLaVA (Liu et al., NeurIPS 2023).

The tokenizer expands every `<image>` placeholder into `VLMConfig.num_image_tokens()` image-token ids; `embed`
overwrites those positions with the projected features, image after image in reading order (across the batch,
as llava-hf does). Samples without images sit in the same batch unchanged.

SPHINX's visual side (Lin et al., 2023) rides on the same path, each part optional:
- mixed visual embeddings (`extra_vision`): more towers see the same pixels (normalised by the image processor
  for the first tower, re-normalised to the mean and std each other tower was pretrained with, as SPHINX feeds
  DINOv2 ImageNet's), and their selected features are concatenated along channels with the first tower's,
  token by token, before one projector. A tower whose patch grid differs from the first tower's is resampled
  to it by area: a finer grid is averaged over the patches that cover each cell, a coarser one repeated (as
  SPHINX repeats ConvNeXt's 8x8 grid to 16x16); class tokens, if selected, are concatenated as they are.
  CLIP ViT-L/14 and DINOv2-L/14 at 224 px both give 16x16: nothing is resampled there.
- multi-scale sub-images (`multi_scale`): the image processor gives five views per image (nanovlm/image.py);
  every view of every image goes through each tower in one batched call, and an image's tokens are its views'
  tokens one after the other: global, top-left, top-right, bottom-left, bottom-right.
Where this departs from SPHINX (LLaMA2-Accessory): no Q-Former tokens and no ConvNeXt tower, no learned
start/end embeddings around each view, and the image sits where the template puts `<image>`, as in LLaVA, not
right after BOS.

One checkpoint format, read and written by the end of this file: the llava-hf layout (config.json with
model_type "llava", model.safetensors, tokenizer and preprocessor files), which transformers'
LlavaForConditionalGeneration loads as is. nanovlm-only settings (projector kind, chat template, pad-to-square,
prototypes, SPHINX's extra towers and views) ride along under the "nanovlm" key of config.json, and the extra
towers' weights under `extra_vision_towers.{i}.*` in nanovlm's own module names; a model using any of them
loads in nanovlm only.
"""

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_renamed, read_config, rename, resolve, write_json, write_weights
from .image import ImageProcessor
from .llm import LLM, LLMConfig
from .lora import checked_rename, is_lora_parameter, load_adapter, lora_layers, merged_state_dict, save_adapter
from .projector import Projector
from .prototypes import PrototypeExtractor
from .tokenizer import Tokenizer
from .vision import VisionConfig, VisionTower


@dataclass
class VLMConfig:
    vision: VisionConfig
    llm: LLMConfig
    projector: str = "mlp2x_gelu"
    image_token_id: int = 32000
    template: str = "vicuna_v1"
    pad_to_square: bool = True  # LLaVA-1.5's image_aspect_ratio="pad"
    prototypes: int = 0  # SQ-LLaVA's prototype extractor with this many centres; 0: none
    prototype_norm: str = "feature"  # the axis along which the extractor normalises v(x): feature or token
    extra_vision: list[VisionConfig] = field(default_factory=list)  # SPHINX: more towers, features joined by channel
    multi_scale: bool = False  # SPHINX-1K: five views per image (global, then four quadrants of a 2x image)

    def __post_init__(self) -> None:
        if any(tower.select_feature != self.vision.select_feature for tower in self.extra_vision):
            raise ValueError("every vision tower must select the same tokens (select_feature), to be concatenated")

    @property
    def towers(self) -> list[VisionConfig]:
        return [self.vision, *self.extra_vision]

    @property
    def feature_size(self) -> int:
        """The width of the features the projector takes: every tower's, concatenated."""
        return sum(tower.hidden_size for tower in self.towers)

    def image_grid(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(views, rows, columns): an image's tokens are `views` blocks, each [class token +] rows x columns
        patches in row-major order, on the first tower's grid; image_size is a view's side (default the first
        tower's image size)."""
        rows, columns = self.vision.grid(image_size or self.vision.image_size, image_size or self.vision.image_size)
        return (5 if self.multi_scale else 1), rows, columns

    def num_image_tokens(self, image_size: int | None = None) -> int:
        """How many image-token ids one `<image>` becomes: every count of image tokens comes from here."""
        views, rows, columns = self.image_grid(image_size)
        return views * (rows * columns + (self.vision.select_feature == "cls_patch"))

    @classmethod
    def from_hf(cls, hf: dict) -> "VLMConfig":
        if hf.get("model_type") != "llava":
            raise ValueError(f"expected a llava config, got model_type {hf.get('model_type')!r}")
        layer, strategy = hf.get("vision_feature_layer", -2), hf.get("vision_feature_select_strategy", "default")
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index, got {layer!r}")
        if strategy not in SELECT_STRATEGIES:
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
            raise ValueError("only llava's GELU projector with biases is supported")
        extra = hf.get("nanovlm", {})
        vision = VisionConfig.from_hf(hf.get("vision_config") or LLAVA_DEFAULT_VISION, select_layer=layer,
                                      select_feature=SELECT_STRATEGIES[strategy],
                                      select_norm=extra.get("select_norm", False))
        return cls(vision=vision, llm=LLMConfig.from_hf(hf.get("text_config") or {}),
                   image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
                   projector=extra.get("projector", "mlp2x_gelu"), template=extra.get("template", "vicuna_v1"),
                   pad_to_square=extra.get("pad_to_square", True), prototypes=extra.get("prototypes", 0),
                   prototype_norm=extra.get("prototype_norm", "feature"),
                   extra_vision=[VisionConfig(**tower) for tower in extra.get("extra_vision", [])],
                   multi_scale=extra.get("multi_scale", False))

    def to_hf(self) -> dict:
        strategy = {v: k for k, v in SELECT_STRATEGIES.items()}[self.vision.select_feature]
        return {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "vision_config": self.vision.to_hf(), "text_config": self.llm.to_hf(),
            "image_token_index": self.image_token_id, "image_seq_length": self.num_image_tokens(),
            "vision_feature_layer": self.vision.select_layer, "vision_feature_select_strategy": strategy,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "tie_word_embeddings": self.llm.tie_word_embeddings,
            "nanovlm": self.nanovlm_settings(),
        }

    def nanovlm_settings(self) -> dict:
        """What transformers' config has no field for: config.json's "nanovlm" entry."""
        return {"projector": self.projector, "template": self.template, "pad_to_square": self.pad_to_square,
                "prototypes": self.prototypes, "prototype_norm": self.prototype_norm,
                "select_norm": self.vision.select_norm, "extra_vision": [asdict(tower) for tower in self.extra_vision],
                "multi_scale": self.multi_scale}


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        self.extra_vision_towers = nn.ModuleList(VisionTower(tower) for tower in cfg.extra_vision)  # SPHINX's
        # Only SQ-LLaVA models have it; transformers' Llava has no such module and ignores its weights.
        self.prototype_extractor = (PrototypeExtractor(cfg.feature_size, cfg.prototypes, key_norm=cfg.prototype_norm)
                                    if cfg.prototypes else None)
        self.multi_modal_projector = Projector(cfg.projector, cfg.feature_size, cfg.llm.hidden_size)
        self.language_model = LLM(cfg.llm)

    @property
    def vision_towers(self) -> list[VisionTower]:
        return [self.vision_tower, *self.extra_vision_towers]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) images, or (N, 5, 3, S, S) views of each with multi_scale -> (N, image tokens, llm hidden)."""
        if self.cfg.multi_scale and (pixel_values.ndim != 5 or pixel_values.shape[1] != 5):
            raise ValueError(f"a multi-scale model takes (N, 5, 3, S, S) views, got {tuple(pixel_values.shape)}")
        if not self.cfg.multi_scale and pixel_values.ndim != 4:
            raise ValueError(f"this model takes (N, 3, S, S) images, got {tuple(pixel_values.shape)}")
        views = pixel_values.flatten(0, -4)  # (N * views, 3, S, S): one call per tower for every view of every image
        features = torch.cat([self.tower_features(tower, views) for tower in self.vision_towers], dim=-1)
        features = features.reshape(len(pixel_values), -1, self.cfg.feature_size)  # (N, views * tokens, features)
        if self.prototype_extractor is not None:
            features = self.prototype_extractor(features)  # same shape
        return self.multi_modal_projector(features)  # (N, image tokens, llm hidden)

    def tower_features(self, tower: VisionTower, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) pixels normalised for the first tower -> (M, tokens, tower hidden): `tower`'s features on
        the first tower's grid."""
        features = tower(renormalize(pixels, self.cfg.vision.pixel_stats, tower.cfg.pixel_stats))
        grid, own_grid = self.cfg.vision.grid(*pixels.shape[-2:]), tower.cfg.grid(*pixels.shape[-2:])
        if own_grid == grid:
            return features
        cls = features.shape[1] - own_grid[0] * own_grid[1]  # 1 with the class token, else 0
        patches = features[:, cls:].transpose(1, 2).unflatten(2, own_grid)  # (M, hidden, own rows, own columns)
        patches = F.interpolate(patches, size=grid, mode="area")  # (M, hidden, rows, columns)
        return torch.cat([features[:, :cls], patches.flatten(2).transpose(1, 2)], dim=1)  # (M, tokens, hidden)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids and (N, 3, S, S) images (or (N, 5, 3, S, S) views) -> (B, T, llm hidden) embeddings."""
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        # The image id may lie past the vocabulary (added to the tokenizer only), so never look it up.
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        n_features = 0 if pixel_values is None else len(pixel_values) * self.cfg.num_image_tokens(
            pixel_values.shape[-1])
        if int(is_image.sum()) != n_features:
            raise ValueError(f"the batch has {int(is_image.sum())} image-token positions but its "
                             f"{0 if pixel_values is None else len(pixel_values)} images give {n_features} features")
        if n_features:
            features = self.encode_images(pixel_values).to(embeds.dtype)  # (N, tokens, D)
            # the N * tokens image positions take the features in reading order: still (B, T, D)
            embeds = embeds.masked_scatter(is_image[..., None], features)
        return embeds

    def grid(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, T, 2): each image token's (row, column) in its view's patch grid, 0 for text and class tokens;
        None unless the LLM turns its rotary position by them (`LLMConfig.grid_rope`)."""
        if not self.cfg.llm.grid_rope:
            return None
        views, rows, columns = self.cfg.image_grid()
        cls = int(self.cfg.vision.select_feature == "cls_patch")
        patch = torch.arange(rows * columns, device=input_ids.device)
        view = torch.stack([patch // columns, patch % columns], dim=-1)  # (rows * columns, 2), row-major
        image = torch.cat([torch.zeros(cls, 2, dtype=torch.long, device=input_ids.device), view]).repeat(views, 1)
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        grid = torch.zeros(*input_ids.shape, 2, dtype=torch.long, device=input_ids.device)
        # every image's tokens are one run of num_image_tokens() ids, in order: the k-th of a run is image[k]
        return grid.masked_scatter(is_image[..., None], image.repeat(int(is_image.sum()) // len(image), 1))

    def hidden(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's final normalised hidden states (B, T, D) of a right-padded batch."""
        return self.language_model(self.embed(input_ids, pixel_values), grid=self.grid(input_ids))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of a right-padded batch."""
        return self.language_model.lm_head(self.hidden(input_ids, pixel_values))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy over the positions whose label is not -100, averaged or summed.

        Only those positions are projected to the vocabulary: in a LLaVA batch most positions are image,
        system or question tokens, so this saves most of the lm_head's time and memory.
        """
        hidden = self.hidden(input_ids, pixel_values)  # (B, T, D)
        targets = labels[:, 1:]  # (B, T - 1): position t predicts token t + 1
        keep = targets != -100  # (B, T - 1), K positions true
        logits = self.language_model.lm_head(hidden[:, :-1][keep])  # (K, D) -> (K, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The named parameters of each part, the unit a recipe trains or freezes: vision (every tower),
        projector, llm, prototypes (if any), and the LoRA adapters of a part as their own group (vision_lora,
        llm_lora). A model with several towers also has vision0, vision1, ...: one tower each, so that a recipe
        trains all towers alike (vision) or each its own way; the training loop refuses groups that overlap."""
        towers = ["vision_tower"] + [f"extra_vision_towers.{i}" for i in range(len(self.extra_vision_towers))]
        parts = {"vision": towers, "projector": ["multi_modal_projector"], "llm": ["language_model"],
                 "prototypes": ["prototype_extractor"] if self.prototype_extractor is not None else []}
        if len(towers) > 1:
            parts |= {f"vision{i}": [tower] for i, tower in enumerate(towers)}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for group, modules in parts.items():
            for module in modules:
                groups.setdefault(group, [])
                for name, p in self.get_submodule(module).named_parameters(prefix=module):
                    groups.setdefault(group + "_lora" if is_lora_parameter(name) else group, []).append((name, p))
        return groups

    def add_prototype_extractor(self, num_prototypes: int, key_norm: str = "feature") -> None:
        """Put a new SQ-LLaVA prototype extractor between the vision tower and the projector."""
        self.cfg.prototypes, self.cfg.prototype_norm = num_prototypes, key_norm
        weight = self.multi_modal_projector.linear_1.weight
        self.prototype_extractor = PrototypeExtractor(self.cfg.feature_size, num_prototypes, key_norm=key_norm).to(
            device=weight.device, dtype=weight.dtype)

    def save_adapter(self, path: str | Path, base_model: str | None,
                     modules_to_save: tuple[str, ...] = ("multi_modal_projector", "prototype_extractor")) -> None:
        """Write what training added to `base_model`, so that load_adapter rebuilds this model from it:
        - language_model/: the LLM's LoRA and, as PEFT's modules_to_save, the fully trained `modules_to_save`
          that this model has (the projector; the prototype extractor, which transformers' Llava lacks, so
          PEFT passes over it and only nanovlm's load_adapter puts it back);
        - vision_tower/: the vision tower's LoRA, if any, apart because PEFT has one dropout per adapter;
        - nanovlm.json: the settings PEFT's config has no field for (the extractor's, the chat template).
        PEFT puts both adapters on transformers' LlavaForConditionalGeneration (tests/test_selfq.py)."""
        path = Path(path)
        layers = lora_layers(self)
        kept = {checked_rename(name, PEFT_RENAMES): self.get_submodule(name) for name in modules_to_save
                if getattr(self, name) is not None}
        for tower in ADAPTER_TOWERS:
            tower_layers = {checked_rename(name, PEFT_RENAMES): layer for name, layer in layers.items()
                            if name.startswith(tower + ".")}
            if tower == "language_model":
                save_adapter(path / tower, tower_layers, base_model, kept)
            elif tower_layers:
                save_adapter(path / tower, tower_layers, base_model)
            else:
                shutil.rmtree(path / tower, ignore_errors=True)  # an earlier run's, which load_adapter would load
        write_json(path / "nanovlm.json", self.cfg.nanovlm_settings())

    def load_adapter(self, path: str | Path) -> None:
        """Rebuild the model save_adapter wrote from this one, its base: both towers' LoRA, the projector, the
        prototype extractor (added if the base has none) and the chat template."""
        path = Path(path)
        settings = json.loads((path / "nanovlm.json").read_text())
        if settings["prototypes"]:
            if (self.cfg.prototypes, self.cfg.prototype_norm) != (settings["prototypes"], settings["prototype_norm"]):
                self.add_prototype_extractor(settings["prototypes"], settings["prototype_norm"])
        elif self.prototype_extractor is not None:
            raise ValueError(f"{path}: the adapted model has no prototype extractor, its base model has one")
        self.cfg.template = settings["template"]
        for tower in ADAPTER_TOWERS:
            if (path / tower).is_dir():
                load_adapter(self, path / tower, PEFT_TO_MODULE)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "VLM":
        """A llava-hf checkpoint (any key layout) or a nanovlm checkpoint directory, by repo id or path."""
        path = resolve(name_or_path, revision)
        with torch.device("meta"):
            model = cls(VLMConfig.from_hf(read_config(path)))
        skip = ("language_model.lm_head.",) if model.cfg.llm.tie_word_embeddings else ()
        load_renamed(model, path, LLAVA_RENAMES, dtype, device, skip)
        model.language_model.tie_weights()
        return model

    @classmethod
    def from_parts(cls, vision: str, llm: str, projector: str = "mlp2x_gelu", template: str = "vicuna_v1",
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   extra_vision: tuple[str, ...] = (), multi_scale: bool = False, **vision_overrides) -> "VLM":
        """A new VLM from a pretrained vision checkpoint (CLIP, or DINOv2), SPHINX's other towers if any, and a
        pretrained LLM (whose tokenizer gives the `<image>` id), with a freshly initialised projector: the start
        of LLaVA's stage 1. vision_overrides (select_layer, ...) apply to every tower."""
        towers = [VisionTower.from_pretrained(name, dtype=dtype, device=device, **vision_overrides)
                  for name in (vision, *extra_vision)]
        language_model = LLM.from_pretrained(llm, dtype=dtype, device=device)
        image_token_id = Tokenizer.from_dir(resolve(llm)).image_token_id
        cfg = VLMConfig(towers[0].cfg, language_model.cfg, projector, image_token_id, template,
                        extra_vision=[tower.cfg for tower in towers[1:]], multi_scale=multi_scale)
        with torch.device("meta"):
            model = cls(cfg)
        model.vision_tower, model.language_model = towers[0], language_model
        model.extra_vision_towers = nn.ModuleList(towers[1:])
        model.multi_modal_projector = Projector(projector, cfg.feature_size, cfg.llm.hidden_size).to(
            device=device, dtype=dtype)
        return model

    def save_pretrained(self, path: str | Path, tokenizer: Tokenizer | None = None,
                        image_processor: ImageProcessor | None = None) -> None:
        """Write the llava-hf layout, LoRA adapters merged into the weights; every file is written atomically."""
        path = Path(path)
        tied = self.cfg.llm.tie_word_embeddings
        state = {rename(k, SAVE_RENAMES): v for k, v in merged_state_dict(self).items()
                 if not (tied and k == "language_model.lm_head.weight")}
        write_weights(path / "model.safetensors", state)
        write_json(path / "config.json", self.cfg.to_hf())
        if tokenizer is not None:
            tokenizer.save(path)
        if image_processor is not None:
            image_processor.save(path)


def renormalize(pixels: torch.Tensor, stats: tuple, own_stats: tuple) -> torch.Tensor:
    """(M, 3, H, W) pixels normalised with `stats` = (mean, std) per channel, normalised with `own_stats` instead."""
    if stats == own_stats:
        return pixels
    mean, std, own_mean, own_std = (torch.tensor(s, dtype=pixels.dtype, device=pixels.device)[:, None, None]
                                    for s in (*stats, *own_stats))
    return (pixels * std + mean - own_mean) / own_std


def load_pretrained(name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[VLM, Tokenizer, ImageProcessor]:
    """The model, its tokenizer and its image preprocessing, from one llava-hf or nanovlm checkpoint."""
    path = resolve(name_or_path, revision)
    model = VLM.from_pretrained(str(path), dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.image_token_id != model.cfg.image_token_id:
        raise ValueError(f"{path}: the tokenizer's <image> id {tokenizer.image_token_id} differs from the config's "
                         f"image_token_index {model.cfg.image_token_id}")
    processor = ImageProcessor.from_dir(path, model.cfg.vision.image_size, pad_to_square=model.cfg.pad_to_square,
                                        multi_scale=model.cfg.multi_scale)
    return model, tokenizer, processor


# The llava-hf checkpoint layout.
# Checkpoint prefix -> module prefix, first match wins. llava-hf checkpoints come in several layouts: the
# original one on the Hub (the one nanovlm writes), transformers >= 4.52's `model.*` one, and vision towers
# with or without the `vision_model.` level (transformers 5 writes them without).
LLAVA_RENAMES = [
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("vision_tower.vision_model.encoder.layers.", "vision_tower.layers."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.encoder.layers.", "vision_tower.layers."),
    ("vision_tower.", "vision_tower."),
    ("model.vision_tower.vision_model.encoder.layers.", "vision_tower.layers."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.encoder.layers.", "vision_tower.layers."),
    ("model.vision_tower.", "vision_tower."),
    ("prototype_extractor.", "prototype_extractor."),
    ("extra_vision_towers.", "extra_vision_towers."),
]
SAVE_RENAMES = [  # module prefix -> checkpoint prefix, the inverse of the first block above
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("prototype_extractor.", "prototype_extractor."),
    ("extra_vision_towers.", "extra_vision_towers."),
]
# Module prefix -> the module names of transformers' LlavaForConditionalGeneration, which PEFT adapters use.
PEFT_RENAMES = [
    ("language_model.", "model.language_model."),
    ("vision_tower.layers.", "model.vision_tower.encoder.layers."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("prototype_extractor.", "model.prototype_extractor."),  # a name transformers' Llava does not have
]
ADAPTER_TOWERS = ("language_model", "vision_tower")  # save_adapter writes one PEFT adapter per tower
PEFT_TO_MODULE = [(new, old) for old, new in PEFT_RENAMES]
# transformers' LlavaConfig falls back on this vision config when a checkpoint's config omits it.
LLAVA_DEFAULT_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14)
SELECT_STRATEGIES = {"default": "patch", "full": "cls_patch"}
