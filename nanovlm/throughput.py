"""Throughput of a training step: tokens per second per process (GPU) and model FLOPs utilisation (MFU).

Model FLOPs per token (Chowdhery et al., PaLM, 2022, appendix B): 6 N for the LLM's matrices, forward and
backward (N: its linear layers' weights and the lm_head; the embedding table is a lookup), plus 12 L d T for
attention (L layers, width d, T the sequence length of the micro-batch, padding included). Tokens are the
sequence positions processed, padding included. The vision tower is not counted: in LLaVA-1.5's recipes it is
frozen (a forward pass only), about 1% of the FLOPs of a step. MFU is the model FLOPs per second over the
device's dense bf16 peak (PEAK_BF16_FLOPS); a device not in that table, or a CPU, gets no MFU.
"""

import time

import torch

from .llm import LLMConfig
from .vlm import VLMConfig

# Dense bf16 tensor-core peaks from the vendors' data sheets, first match in the device's name wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
                   ("A10", 125e12)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def flops_per_token(cfg: LLMConfig, length: int) -> float:
    """Model FLOPs, forward and backward, of one token of a sequence of `length` tokens."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    attention = d * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)  # q, o, k, v
    matrices = layers * (attention + 3 * d * cfg.intermediate_size) + d * cfg.vocab_size
    return 6 * matrices + 12 * layers * d * length


class Throughput:
    """Times the steps of the loop; step(micro_batches) is called once a step, after the optimizer's."""

    def __init__(self, cfg: VLMConfig, env):
        self.cfg, self.env, self.peak = cfg.llm, env, peak_flops(env.device)
        self.last = time.time()

    def step(self, micro_batches: list[dict]) -> dict[str, float]:
        """This step's tokens/s per process and MFU (where the device's peak is known), over every process."""
        tokens = sum(b["input_ids"].numel() for b in micro_batches)
        flops = sum(b["input_ids"].numel() * flops_per_token(self.cfg, b["input_ids"].shape[1]) for b in micro_batches)
        tokens, flops = self.env.sum(tokens), self.env.sum(flops)
        now = time.time()
        seconds, self.last = now - self.last, now
        record = {"tokens_per_s_per_gpu": round(tokens / seconds / self.env.world_size, 1)}
        if self.peak is not None:
            record["mfu"] = round(flops / seconds / (self.env.world_size * self.peak), 4)
        return record

    @staticmethod
    def shown(record: dict) -> dict[str, str]:
        """The progress bar's throughput fields."""
        return {"tok/s/gpu": f"{record['tokens_per_s_per_gpu']:.0f}"} | (
            {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})
