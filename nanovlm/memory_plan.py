"""The memory plan of a run: what one GPU will hold, printed before any model is built (`--dry_run` stops there).

Per process, for a GPU run (bf16 compute, fp32 master weights of the trained parameters, nanovlm/train.py):
- weights: 4 bytes a trained parameter, 2 a frozen one; under FSDP each process holds 1/N of them;
- gradients: 4 bytes a trained parameter, sharded under FSDP; DDP holds them twice (its reduction buckets).
  FSDP with gradient accumulation keeps the whole fp32 gradient between micro-batches, since it reduce-scatters
  on a step's last micro-batch only (nanovlm/sharding.py);
- optimizer: AdamW's two fp32 moments, 8 bytes a trained parameter, sharded under FSDP;
- FSDP's working set: the root unit's weights (embeddings, lm_head, projector, norms) and two blocks (the one
  running and the one prefetched) all-gathered in bf16, and one block's fp32 gradient before its reduce-scatter;
- activations, a worst case: every sequence max_length tokens long and every position a target. A transformer
  layer keeps about (16 d + 6 f) bytes a token in bf16 (d its width, f its MLP's; the inputs of its norms,
  projections and SwiGLU; after Korthikanti et al., 2022, without attention scores, which SDPA never stores); with
  gradient checkpointing, only each layer's input (2 d bytes a token) and one layer at a time. A trained vision
  tower adds its own layers over each image's tokens. The logits of the loss take 10 bytes a target position and
  vocabulary entry (bf16 logits, their fp32 copy, its gradient).
LoRA adapters (SQ-LLaVA, STIC) are not counted: they add well under 1% of the weights. The verdict allows 1 GiB
for the CUDA context and the allocator's slack.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import read_config
from .llm import LLMConfig
from .presets import TINY_LLM, TINY_VISION, TINY_VOCAB
from .sharding import BLOCKS
from .vision import VisionConfig
from .vlm import VLM, VLMConfig

GiB = 2**30
OVERHEAD = 1 * GiB  # CUDA context, allocator fragmentation
# The architectures of the pretrained presets, so that a plan needs no download: LLaVA-1.5-7B is CLIP ViT-L/14 at
# 336 px (openai/clip-vit-large-patch14-336) and Vicuna-7B v1.5 (lmsys/vicuna-7b-v1.5, LLaMA-2-7B's shape).
ARCHITECTURES = {
    "llava15-7b": VLMConfig(VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=336, patch_size=14),
                            LLMConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)),
}


@dataclass
class MemoryPlan:
    """Bytes a process holds, by kind, for one run."""
    params: int  # parameters of the whole model
    trainable: int  # of them, trained
    weights: float
    gradients: float
    optimizer: float
    working_set: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.working_set + self.activations + self.logits
                + OVERHEAD)

    def fits(self, device_bytes: float) -> bool:
        return self.total <= device_bytes

    def describe(self, title: str, device: str | None, device_bytes: float | None) -> str:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("optimizer (AdamW)", self.optimizer),
                ("FSDP working set", self.working_set), ("activations (worst case)", self.activations),
                ("logits (worst case)", self.logits), ("CUDA context, slack", OVERHEAD), ("total", self.total)]
        lines = [f"memory plan: {title}",
                 f"  parameters {self.params / 1e9:.3f} B, trained {self.trainable / 1e9:.3f} B"]
        lines += [f"  {name:<26}{value / GiB:8.2f} GiB" for name, value in rows if value]
        if device_bytes is not None:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(f"  {verdict} on {device} ({device_bytes / GiB:.0f} GiB)")
        else:
            lines.append("  no GPU found; it " + ", ".join(
                f"{'fits' if self.fits(size * GiB) else 'does NOT fit'} on {size} GiB" for size in (24, 40, 80)))
        return "\n".join(lines)


def plan(cfg: VLMConfig, trained: list[str], world_size: int, micro_batch: int, accumulation: int,
         max_length: int, gradient_checkpointing: bool, fsdp: bool) -> MemoryPlan:
    """The plan of training the parameter groups `trained` (VLM.parameter_groups' names) of a model `cfg`."""
    with torch.device("meta"):
        model = VLM(cfg)
    groups = model.parameter_groups()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for group in trained for _, p in groups.get(group, []))
    shards = world_size if fsdp else 1
    weights = (4 * trainable + 2 * (params - trainable)) / shards
    gradients = 4 * trainable / shards if fsdp else (2 if world_size > 1 else 1) * 4 * trainable
    if fsdp and accumulation > 1:
        gradients += 4 * trainable
    block = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, BLOCKS))
    in_blocks = sum(p.numel() for m in model.modules() if isinstance(m, BLOCKS) for p in m.parameters())
    working_set = 2 * (params - in_blocks) + 2 * 2 * block + 4 * block if fsdp else 0
    llm = cfg.llm
    tokens = micro_batch * max_length
    activations = layer_activations(tokens, llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers,
                                    gradient_checkpointing)
    for tower in cfg.towers if any(group.startswith("vision") for group in trained) else []:
        image_tokens = micro_batch * cfg.num_image_tokens()
        activations += layer_activations(image_tokens, tower.hidden_size, tower.intermediate_size,
                                         tower.layers_to_run, gradient_checkpointing)
    return MemoryPlan(params, trainable, weights, gradients, 8 * trainable / shards, working_set, activations,
                      10 * tokens * llm.vocab_size)


def layer_activations(tokens: int, d: int, f: int, layers: int, gradient_checkpointing: bool) -> float:
    """Bytes of bf16 activations that `layers` transformer layers keep for the backward pass over `tokens`."""
    per_layer = tokens * (16 * d + 6 * f)
    return layers * 2 * tokens * d + per_layer if gradient_checkpointing else layers * per_layer


def architecture(preset: str, init: str | None) -> VLMConfig | None:
    """The model a run will train, known before it is built: the --init checkpoint's config where it is a local
    folder, else the preset's architecture (the tiny preset's is fixed but for its learnt vocabulary, at most
    TINY_VOCAB entries); None for any other preset started from the Hub."""
    if init is not None and (Path(init) / "config.json").is_file():
        return VLMConfig.from_hf(read_config(Path(init)))
    if preset == "tiny":
        return VLMConfig(TINY_VISION, LLMConfig(vocab_size=TINY_VOCAB, **TINY_LLM))
    return ARCHITECTURES.get(preset)


def device_memory() -> tuple[str | None, float | None]:
    """The GPU this process would train on, by name, and its memory in bytes; (None, None) without one."""
    if not torch.cuda.is_available():
        return None, None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, float(props.total_memory)
