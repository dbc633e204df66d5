"""The projector: maps vision features into the LLM's embedding space (Liu et al., 2023; 2024; Lin et al., 2023).

`linear` is LLaVA-1's single matrix W x; `mlp2x_gelu` is LLaVA-1.5's two-layer MLP W2 gelu(W1 x); `linear_ln` is
SPHINX's LayerNorm(W x), which maps the channel-concatenated features of several encoders. Layer names follow
llava-hf's `multi_modal_projector.linear_{1,2}`.
"""

import torch
import torch.nn as nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "linear_ln")


class Projector(nn.Module):
    def __init__(self, kind: str, vision_dim: int, llm_dim: int):
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector {kind!r}; choose one of {PROJECTOR_TYPES}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(llm_dim, llm_dim)
        if kind == "linear_ln":
            self.norm = nn.LayerNorm(llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            return self.linear_2(self.act(x))
        return self.norm(x) if self.kind == "linear_ln" else x
