"""Tiny random checkpoints written by transformers in the exact Hub format, as references for the tests.

Weights are perturbed away from transformers' initialisation (zero biases, unit norms) so that every
parameter, including biases and norm weights, influences the outputs a parity test compares.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Pretrained on a 5x5 grid (35 px); the 28 px images of the VLM tests are a smaller grid, as 224 px is for 518.
DINOV2 = dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4, image_size=35, patch_size=7)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLM_VARIANTS = {
    "gqa": {},
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=4),
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                                                original_max_position_embeddings=32)),
}


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def clip(path: Path, **vision) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=99), vision_config=VISION | vision,
                     projection_dim=8)
    model = CLIPModel(cfg).eval()
    perturb(model)
    model.save_pretrained(path)
    return path


def dinov2(path: Path, **vision) -> Path:
    """A Dinov2Model checkpoint as transformers saves it, which is the key layout of facebook/dinov2-*."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    model = Dinov2Model(Dinov2Config(**DINOV2 | vision)).eval()
    perturb(model, 3)
    model.save_pretrained(path)
    return path


def llama(path: Path, variant: str = "gqa", **save_kwargs) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**TEXT | LLM_VARIANTS[variant])).eval()
    perturb(model, 1)
    model.save_pretrained(path, **save_kwargs)
    return path


# How each key layout of llava-hf checkpoints spells what transformers 5 writes.
LLAVA_LAYOUTS = {
    "hub_original": [("vision_tower.", "vision_tower.vision_model.")],
    "transformers_4_52": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                          ("vision_tower.", "model.vision_tower.vision_model."),
                          ("multi_modal_projector.", "model.multi_modal_projector.")],
}


def llava(path: Path, image_token_id: int = 1023, layout: str = "saved", **text) -> Path:
    """A LlavaForConditionalGeneration checkpoint as transformers saves it, or rewritten into another key layout
    found on the Hub: the original llava-hf one, or the `model.*` one of transformers 4.52 to 4.x."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(2)
    cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model") | VISION, text_config=TEXT | text,
                      image_token_index=image_token_id, vision_feature_layer=-2,
                      image_seq_length=(VISION["image_size"] // VISION["patch_size"]) ** 2)
    model = LlavaForConditionalGeneration(cfg).eval()
    perturb(model, 2)
    model.save_pretrained(path)
    if layout != "saved":
        file = path / "model.safetensors"
        state = {}
        for key, tensor in load_file(file).items():
            old, new = next(((o, n) for o, n in LLAVA_LAYOUTS[layout] if key.startswith(o)), ("", ""))
            state[new + key[len(old):]] = tensor
        save_file(state, file, metadata={"format": "pt"})
    return path


def hub_cache(home: Path, repo_id: str, source: Path, commit: str = "0" * 40) -> None:
    """Lay `source`'s files out as huggingface_hub's cache under HF_HOME=home: blobs, a snapshot of symlinks
    and refs/main, exactly as a download leaves them."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())
