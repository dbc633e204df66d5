"""The LLaMA-family decoder: Llama-2/3, Vicuna, Mistral, TinyLlama, SmolLM2 (Touvron et al., 2023).

Each block is x = x + attn(rmsnorm(x)); x = x + mlp(rmsnorm(x)), with
- RMSNorm: x / sqrt(mean(x^2) + eps) * w, computed in float32;
- rotary position embeddings in the rotate-half layout, inv_freq_i = theta^(-2i/d), optionally rescaled by
  Llama-3's `rope_scaling` (long wavelengths divided by `factor`, a smooth ramp between); with `grid_rope` (the
  tiny preset only) some pairs turn with an image token's row and column instead (`LLM.rope`);
- grouped-query attention: `num_key_value_heads` key/value heads shared by groups of query heads;
- SwiGLU MLP: down(silu(gate(x)) * up(x)).
Module names follow the Hugging Face checkpoints with `model.` stripped, so loading is a fixed rename.
"""

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_renamed, read_config, resolve

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LLMConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    # The tiny preset's 2-D rotary position for image tokens (not in any checkpoint on the Hub): see `rope`.
    grid_rope: bool = False
    extra: dict = field(default_factory=dict)  # other checkpoint config keys, written back on save

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported LLM model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_hf(cls, hf: dict) -> "LLMConfig":
        """From a Hub config.json. Missing keys take transformers' LlamaConfig defaults (llava-hf relies on them);
        both the classic `rope_theta`/`rope_scaling` keys and transformers-5 `rope_parameters` are read."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported LLM activation {act!r}; LLaMA-family models use 'silu'")
        names = [f for f in cls.__dataclass_fields__ if f not in ("rope_theta", "rope_scaling", "extra")]
        fields = {k: hf[k] for k in names if hf.get(k) is not None}
        fields.setdefault("num_key_value_heads", fields.get("num_attention_heads", 32))
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if "type" in rope:  # older configs spell it "type"
            rope["rope_type"] = rope.pop("type")
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        skip = set(names) | {"rope_theta", "rope_scaling", "rope_parameters", "architectures", "transformers_version"}
        extra = {k: v for k, v in hf.items() if k not in skip}
        return cls(**fields, rope_theta=theta, rope_scaling=scaling, extra=extra)

    def to_hf(self) -> dict:
        """config.json's fields; `grid_rope` only when on (transformers' Llama has no such field, and a model
        with it loads in nanovlm only)."""
        skip = ("extra", "rope_scaling") + (() if self.grid_rope else ("grid_rope",))
        hf = {k: v for k, v in asdict(self).items() if k not in skip}
        hf |= {"hidden_act": "silu", "rope_scaling": self.rope_scaling, "architectures": ["LlamaForCausalLM"]}
        return self.extra | hf


def rope_inv_freq(cfg: LLMConfig, device: torch.device | None = None) -> torch.Tensor:
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("rope_type") == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout: x * cos + (-x2, x1) * sin, where x = (x1, x2) halves. The sign
    is folded into `signed_sin` = (-sin, sin) once per forward, so each call is a roll and two products, not a
    chunk, a negation and a concatenation."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)  # one kernel


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions and filled left to right.

    A dynamic cache attends to the positions filled so far. A static one (`static=True`) keeps every shape fixed,
    which torch.compile needs to compile a decoding step once and CUDA graphs need to replay it: it writes at a
    position held in a tensor and always attends to all `max_len` positions, the caller's mask hiding the unfilled
    ones (zeros, never garbage, so a masked score is finite).
    """

    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, device: str | torch.device,
                 dtype: torch.dtype, static: bool = False):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        new = torch.zeros if static else torch.empty
        self.k = [new(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [new(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.static = static
        self.length = 0  # positions filled (dynamic), advanced by LLM.forward after all layers wrote
        self.position = torch.zeros((), dtype=torch.long, device=device)  # the same count, as a tensor (static)
        if static:  # CUDA graphs may keep these addresses: they are updated in place, never replaced
            for t in (*self.k, *self.v, self.position):
                torch._dynamo.mark_static_address(t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.static:
            index = self.position + torch.arange(k.shape[2], device=k.device)
            self.k[layer].index_copy_(2, index, k)
            self.v[layer].index_copy_(2, index, v)
            return self.k[layer], self.v[layer]
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        if self.static:
            self.position += n
        else:
            self.length += n


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape  # batch, new positions, hidden
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # cos, sin: (B, 1, T, head_dim), broadcast over heads
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv, S, head_dim), S = cached + T positions
        # (B, n_head, T, head_dim); each key/value head serves n_head / n_kv query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, n_head * head_dim) -> (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.compiled_decode = None  # set by compile_decoding()

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype,
             grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (-sin, sin) of shape (B, 1, T, head_dim), computed in float32 like the reference.

        With `grid_rope`, the frequency pairs take turns (row, column, sequence, row, ...: the grid gets the
        fastest, as its coordinates span a few cells): row pairs turn with the token's image row, column pairs
        with its column, the rest with its place in the sequence. grid (B, T, 2) holds each image token's (row,
        column), 0 for text (None: all text). So a text token's query meets an image token's key turned by that
        token's row and column, whatever the text's distance from the image, and attention can prefer an object
        by where it is without the place passing through the tower, the projector or the values.
        """
        inv_freq = rope_inv_freq(self.cfg, position_ids.device)  # (head_dim / 2,)
        positions = position_ids[..., None].float()  # (B, T, 1)
        if self.cfg.grid_rope:
            if grid is None:
                grid = torch.zeros(*position_ids.shape, 2, dtype=torch.long, device=position_ids.device)
            axis = (torch.arange(len(inv_freq), device=position_ids.device) + 1) % 3  # 1 row, 2 column, 0 sequence
            coordinates = torch.cat([positions, grid.float()], dim=-1)  # (B, T, 3): sequence, row, column
            positions = coordinates[..., axis]  # (B, T, head_dim / 2)
        freqs = positions * inv_freq  # (B, T, head_dim / 2)
        # (B, 1, T, head_dim), the rotate-half layout; cos(-f) = cos(f) and sin(-f) = -sin(f) give the signed sin
        angles = torch.cat([-freqs, freqs], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                grid: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, T, D) -> final normalised hidden states (B, T, D); apply `lm_head` for logits.

        Callers that need only some logits (the loss on answer tokens, the last position when generating)
        project only those. mask: None for plain causal attention (training batches are right-padded), else
        a boolean (B, 1, T, cached + T) tensor, True where a query may attend. grid: the image tokens' (row,
        column) with `grid_rope` (`rope`).
        """
        B, T, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device).expand(B, T)
        if mask is None and (past > 0 and T > 1 or cache is not None and cache.static):
            raise ValueError("a multi-token step after the prefill, or any step with a static cache, needs a mask")
        cos, sin = self.rope(position_ids, inputs_embeds.dtype, grid)  # (B, 1, T, head_dim)
        x = inputs_embeds  # (B, T, D) all the way through
        for block in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def decode(self, tokens: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
               cache: KVCache) -> torch.Tensor:
        """One generation step: (B,) tokens at (B,) positions, appended to `cache` -> (B, vocab) next-token logits."""
        hidden = self(self.embed_tokens(tokens[:, None]), position_ids[..., None], mask, cache)  # (B, 1, D)
        return self.lm_head(hidden[:, -1])

    def compile_decoding(self) -> None:
        """Generate through a torch.compile'd `decode`: nanovlm/generate.py then keeps a static cache, so the step
        compiles once per batch shape (at the first generation of that shape; about a minute for a 135M model on
        a CPU) and runs as one fused program. On GPU it is replayed as a CUDA graph (mode "reduce-overhead"). On
        CPU the weights are frozen into it as constants, prepacked for the CPU's matmul kernels (inductor's
        freezing): the model's weights must not change afterwards, so this is for evaluation, not training."""
        cuda = self.embed_tokens.weight.device.type == "cuda"
        self.compiled_decode = torch.compile(self.decode, fullgraph=True, dynamic=False,
                                             mode="reduce-overhead" if cuda else None,
                                             options=None if cuda else {"freezing": True})

    def compile_blocks(self) -> None:
        """Run every decoder block through torch.compile (for training; off by default): its RMSNorms, rotary
        embedding, SwiGLU and residual adds fuse into a few loops around the matmuls, forward and backward. The
        blocks share one compiled program, their weights being its inputs; it compiles at the first call (and once
        more when the sequence length first changes, after which lengths are symbolic)."""
        for block in self.layers:
            block.compile()

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "LLM":
        """A LlamaForCausalLM / MistralForCausalLM checkpoint: a Hub repo id or a local directory."""
        path = resolve(name_or_path, revision)
        with torch.device("meta"):
            model = cls(LLMConfig.from_hf(read_config(path)))
        skip = ("lm_head.",) if model.cfg.tie_word_embeddings else ()
        load_renamed(model, path, [("model.", ""), ("lm_head.", "lm_head.")], dtype, device, skip)
        model.tie_weights()
        return model
