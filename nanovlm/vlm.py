"""The vision-language model: vision tower -> projector -> LLM, as in LLaVA (Liu et al., NeurIPS 2023).

The tokenizer expands every `<image>` placeholder into as many image-token ids as the vision tower yields
features; `embed` overwrites those positions with the projected features, image after image in reading order
(across the batch, as llava-hf does). Samples without images sit in the same batch unchanged.

One checkpoint format, read and written by the end of this file: the llava-hf layout (config.json with
model_type "llava", model.safetensors, tokenizer and preprocessor files), which transformers'
LlavaForConditionalGeneration loads as is. nanovlm-only settings (projector kind, chat template, pad-to-square,
prototypes) ride along under the "nanovlm" key of config.json.
"""

import json
import shutil
from dataclasses import dataclass
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
        vision = VisionConfig.from_hf(hf.get("vision_config") or LLAVA_DEFAULT_VISION, select_layer=layer,
                                      select_feature=SELECT_STRATEGIES[strategy])
        extra = hf.get("nanovlm", {})
        return cls(vision=vision, llm=LLMConfig.from_hf(hf.get("text_config") or {}),
                   image_token_id=hf.get("image_token_index", hf.get("image_token_id", 32000)),
                   projector=extra.get("projector", "mlp2x_gelu"), template=extra.get("template", "vicuna_v1"),
                   pad_to_square=extra.get("pad_to_square", True), prototypes=extra.get("prototypes", 0),
                   prototype_norm=extra.get("prototype_norm", "feature"))

    def to_hf(self) -> dict:
        strategy = {v: k for k, v in SELECT_STRATEGIES.items()}[self.vision.select_feature]
        return {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "vision_config": self.vision.to_hf(), "text_config": self.llm.to_hf(),
            "image_token_index": self.image_token_id, "image_seq_length": self.vision.num_image_tokens(),
            "vision_feature_layer": self.vision.select_layer, "vision_feature_select_strategy": strategy,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "tie_word_embeddings": self.llm.tie_word_embeddings,
            "nanovlm": self.nanovlm_settings(),
        }

    def nanovlm_settings(self) -> dict:
        """What transformers' config has no field for: config.json's "nanovlm" entry."""
        return {"projector": self.projector, "template": self.template, "pad_to_square": self.pad_to_square,
                "prototypes": self.prototypes, "prototype_norm": self.prototype_norm}


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = VisionTower(cfg.vision)
        # Only SQ-LLaVA models have it; transformers' Llava has no such module and ignores its weights.
        self.prototype_extractor = (PrototypeExtractor(cfg.vision.hidden_size, cfg.prototypes,
                                                       key_norm=cfg.prototype_norm) if cfg.prototypes else None)
        self.multi_modal_projector = Projector(cfg.projector, cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.language_model = LLM(cfg.llm)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, tokens, llm hidden) image embeddings."""
        features = self.vision_tower(pixel_values)  # (N, tokens, vision hidden)
        if self.prototype_extractor is not None:
            features = self.prototype_extractor(features)  # same shape
        return self.multi_modal_projector(features)  # (N, tokens, llm hidden)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids and (N, 3, H, W) images -> (B, T, llm hidden) input embeddings."""
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        # The image id may lie past the vocabulary (added to the tokenizer only), so never look it up.
        embeds = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
        n_features = 0 if pixel_values is None else len(pixel_values) * self.cfg.vision.num_image_tokens(
            pixel_values.shape[-1])
        if int(is_image.sum()) != n_features:
            raise ValueError(f"the batch has {int(is_image.sum())} image-token positions but its "
                             f"{0 if pixel_values is None else len(pixel_values)} images give {n_features} features")
        if n_features:
            features = self.encode_images(pixel_values).to(embeds.dtype)  # (N, tokens, D)
            # the N * tokens image positions take the features in reading order: still (B, T, D)
            embeds = embeds.masked_scatter(is_image[..., None], features)
        return embeds

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) of a right-padded batch."""
        return self.language_model.lm_head(self.language_model(self.embed(input_ids, pixel_values)))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: torch.Tensor | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy over the positions whose label is not -100, averaged or summed.

        Only those positions are projected to the vocabulary: in a LLaVA batch most positions are image,
        system or question tokens, so this saves most of the lm_head's time and memory.
        """
        hidden = self.language_model(self.embed(input_ids, pixel_values))  # (B, T, D)
        targets = labels[:, 1:]  # (B, T - 1): position t predicts token t + 1
        keep = targets != -100  # (B, T - 1), K positions true
        logits = self.language_model.lm_head(hidden[:, :-1][keep])  # (K, D) -> (K, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The named parameters of each part, the unit a recipe trains or freezes: vision, projector, llm,
        prototypes (if any) and the LoRA adapters of a part as their own group (vision_lora, llm_lora)."""
        parts = {"vision": "vision_tower", "projector": "multi_modal_projector", "llm": "language_model",
                 "prototypes": "prototype_extractor"}
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for group, attribute in parts.items():
            if getattr(self, attribute) is None:
                continue
            groups[group] = []
            for name, p in getattr(self, attribute).named_parameters(prefix=attribute):
                groups.setdefault(group + "_lora" if is_lora_parameter(name) else group, []).append((name, p))
        return groups

    def add_prototype_extractor(self, num_prototypes: int, key_norm: str = "feature") -> None:
        """Put a new SQ-LLaVA prototype extractor between the vision tower and the projector."""
        self.cfg.prototypes, self.cfg.prototype_norm = num_prototypes, key_norm
        weight = self.multi_modal_projector.linear_1.weight
        self.prototype_extractor = PrototypeExtractor(self.cfg.vision.hidden_size, num_prototypes,
                                                      key_norm=key_norm).to(device=weight.device, dtype=weight.dtype)

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
                   **vision_overrides) -> "VLM":
        """A new VLM from a pretrained CLIP checkpoint and a pretrained LLM (whose tokenizer gives the
        `<image>` id), with a freshly initialised projector: the start of LLaVA's stage 1."""
        vision_tower = VisionTower.from_pretrained(vision, dtype=dtype, device=device, **vision_overrides)
        language_model = LLM.from_pretrained(llm, dtype=dtype, device=device)
        image_token_id = Tokenizer.from_dir(resolve(llm)).image_token_id
        cfg = VLMConfig(vision_tower.cfg, language_model.cfg, projector, image_token_id, template)
        with torch.device("meta"):
            model = cls(cfg)
        model.vision_tower, model.language_model = vision_tower, language_model
        model.multi_modal_projector = Projector(projector, cfg.vision.hidden_size, cfg.llm.hidden_size).to(
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


def load_pretrained(name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[VLM, Tokenizer, ImageProcessor]:
    """The model, its tokenizer and its image preprocessing, from one llava-hf or nanovlm checkpoint."""
    path = resolve(name_or_path, revision)
    model = VLM.from_pretrained(str(path), dtype=dtype, device=device)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer.image_token_id != model.cfg.image_token_id:
        raise ValueError(f"{path}: the tokenizer's <image> id {tokenizer.image_token_id} differs from the config's "
                         f"image_token_index {model.cfg.image_token_id}")
    processor = ImageProcessor.from_dir(path, model.cfg.vision.image_size, pad_to_square=model.cfg.pad_to_square)
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
]
SAVE_RENAMES = [  # module prefix -> checkpoint prefix, the inverse of the first block above
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("vision_tower.layers.", "vision_tower.vision_model.encoder.layers."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("prototype_extractor.", "prototype_extractor."),
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
