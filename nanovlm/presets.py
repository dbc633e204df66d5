"""Model presets: what a run starts from.

- `tiny` (the default everywhere): a small ViT and a small LLaMA decoder built from scratch, with a tokenizer
  learnt from the shapes world's own text, so the first run needs no download and trains on a laptop CPU.
- `small`: CLIP ViT-B/16 + SmolLM2-360M-Instruct (ChatML), a real pairing that fits one consumer GPU.
- `llava15-7b`: CLIP ViT-L/14-336 + Vicuna-7B v1.5, LLaVA-1.5 itself.
- `sphinx-7b`: SPHINX-1K's visual side (Lin et al., 2023) on LLaVA-1.5's LLM: CLIP ViT-L/14 and DINOv2-L/14 at
  224 px, both read as SPHINX reads them (last layer through the final norm, class token kept: 257 tokens of
  1024 + 1024 channels), five views per image (1,285 image tokens), SPHINX's Linear + LayerNorm projector.
- `sphinx-tiny`: the tiny preset with a second tower from scratch (the DINOv2 family at the tiny tower's size
  and grid) and five views per image (80 image tokens); `sphinx-tiny-towers` and `sphinx-tiny-scales` have one
  of the two each. They change nothing else (feature selection, projector, recipe), so that comparing them
  with `tiny` measures the towers and the views alone.
"""

from dataclasses import dataclass, field, replace

import torch

from .checkpoint import resolve
from .image import ImageProcessor
from .llm import LLMConfig
from .tokenizer import Tokenizer
from .vision import VisionConfig
from .vlm import VLM, VLMConfig


@dataclass(frozen=True)
class Preset:
    vision: str | None  # a CLIP (or DINOv2) checkpoint, Hub repo id or directory; None: the tiny tower, from scratch
    llm: str | None  # a LLaMA-family checkpoint; None: the tiny decoder, from scratch
    template: str  # the chat template of instruction tuning and inference
    projector: str = "mlp2x_gelu"
    extra_vision: tuple[str | None, ...] = ()  # SPHINX's further towers; None: the tiny DINOv2 tower, from scratch
    multi_scale: bool = False  # SPHINX-1K's five views per image
    features: dict = field(default_factory=dict)  # VisionConfig overrides for every tower (select_layer, ...)


TINY = Preset(vision=None, llm=None, template="vicuna_v1_bare")
# SPHINX reads CLIP's and DINOv2's last layer through their final norms, class token included: its encoders
# (LLaMA2-Accessory) return all 257 tokens of each, post-LN.
SPHINX_FEATURES = dict(select_layer=-1, select_feature="cls_patch", select_norm=True)
PRESETS = {
    "tiny": TINY,
    "small": Preset(vision="openai/clip-vit-base-patch16", llm="HuggingFaceTB/SmolLM2-360M-Instruct",
                    template="chatml"),
    "llava15-7b": Preset(vision="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-7b-v1.5",
                         template="vicuna_v1"),
    "sphinx-7b": Preset(vision="openai/clip-vit-large-patch14", llm="lmsys/vicuna-7b-v1.5", template="vicuna_v1",
                        projector="linear_ln", extra_vision=("facebook/dinov2-large",), multi_scale=True,
                        features=SPHINX_FEATURES),
    "sphinx-tiny-towers": replace(TINY, extra_vision=(None,)),
    "sphinx-tiny-scales": replace(TINY, multi_scale=True),
    "sphinx-tiny": replace(TINY, extra_vision=(None,), multi_scale=True),
}

# Trained from scratch, the tiny tower has no contrastive last layer to avoid, so it uses its last layer.
# One patch per cell of the shapes world's 4x4 grid (16 image tokens): each object is read off one patch.
TINY_VISION = VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                           image_size=96, patch_size=24, hidden_act="gelu", select_layer=-1)
# grid_rope: the image tokens' rows and columns turn the tiny LLM's rotary position (nanovlm/llm.py), so that
# attention can pick an object by where it is. With LLaVA's 1-D positions alone the tiny model, trained from
# scratch for minutes, never bound what it saw to where it was (spatial relations at chance, captions' left-to-right
# order mostly wrong: results/default_run.md); the real presets keep their checkpoints' 1-D RoPE. Eight heads of 16
# (and a key and value for each): with four of 32 sharing two keys, colour questions about one object of several
# were answered with another object's colour two times in three after the default run (round 12 there).
TINY_LLM = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=True,
                grid_rope=True)
TINY_VOCAB = 640
# SPHINX's second encoder at the tiny scale: the DINOv2 family (LayerScale, no pre-norm, patch bias) with the
# tiny tower's size and grid, so that both give 16 patch tokens and nothing is resampled.
TINY_DINOV2 = replace(TINY_VISION, family="dinov2", layer_norm_eps=1e-6)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) 2-D sine-cosine positions (He et al., MAE, 2022), row-major like the patch grid.

    Used as the initial value of the tiny tower's learned positions: drawn at std 0.02 they would be ~20x
    weaker than the patch contents, and a tower trained from scratch takes hundreds of steps to learn where a
    patch is, which spatial, counting and shape questions all need.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    angles = [pos.reshape(-1, 1) * omega for pos in (y, x)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def tiny_model(texts: list[str], seed: int = 0, preset: Preset = TINY) -> tuple[VLM, Tokenizer, ImageProcessor]:
    """The tiny preset, or a SPHINX variant of it: a tokenizer learnt from `texts` and randomly initialised
    towers (std 0.02)."""
    tokenizer = Tokenizer.train(texts, TINY_VOCAB)
    torch.manual_seed(seed)
    llm = LLMConfig(vocab_size=tokenizer.tok.get_vocab_size(), **TINY_LLM)
    model = VLM(VLMConfig(TINY_VISION, llm, image_token_id=tokenizer.image_token_id, template=preset.template,
                          pad_to_square=False, extra_vision=[TINY_DINOV2 for _ in preset.extra_vision],
                          multi_scale=preset.multi_scale))
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.02)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
    with torch.no_grad():
        for tower in model.vision_towers:
            tower.embeddings.position_embedding.weight[1:] = sincos_2d(
                tower.cfg.image_size // tower.cfg.patch_size, tower.cfg.hidden_size)
    processor = ImageProcessor(size=TINY_VISION.image_size, crop_size=TINY_VISION.image_size, pad_to_square=False,
                               multi_scale=preset.multi_scale)
    return model, tokenizer, processor


def pretrained_model(preset: Preset, dtype: torch.dtype,
                     device: str | torch.device) -> tuple[VLM, Tokenizer, ImageProcessor]:
    """A new VLM from a preset's pretrained towers and LLM, with a fresh projector (LLaVA's stage-1 start)."""
    model = VLM.from_parts(preset.vision, preset.llm, preset.projector, preset.template, dtype, device,
                           preset.extra_vision, preset.multi_scale, **preset.features)
    tokenizer = Tokenizer.from_dir(resolve(preset.llm))
    processor = ImageProcessor.from_dir(resolve(preset.vision), model.cfg.vision.image_size,
                                        multi_scale=preset.multi_scale)
    return model, tokenizer, processor
