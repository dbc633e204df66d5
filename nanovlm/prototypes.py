"""The prototype extractor of SQ-LLaVA (Sun et al., ECCV 2024), between the vision features and the projector.

It clusters an image's patch features x (N, L, D) into K prototypes and adds to every patch the prototype of
its cluster, so the projector sees each patch together with what the image holds that resembles it:

    C_0 = avgpool_K(x)                                  K centres pooled along the token axis
    for T iterations:  C <- c(C);  A = softmax_K(norm(C) norm(v(x))^T);  C <- A f(x)
    S = sigmoid(beta + alpha cos(C, x))                 (K, L) similarity, alpha = 1, beta = 0 learnable
    n*(l) = argmax_n cos(C_n, x_l)                      each patch's nearest centre (hard assignment)
    P_n = (sum_{l: n*(l) = n} S_nl f(x_l) + avgpool_K(f(x))_n) / (|{l: n*(l) = n}| + 1)
    x'_l = x_l + S_{n*(l) l} P_{n*(l)}

c, v and f are Linear(D, D) (3.15M parameters at D = 1024); the token count is unchanged. Where this differs
from the paper or the official code (heliossun/SQ-LLaVA, llava/model/multimodal_projector/cluster.py), and why:
- the nearest centre is a hard assignment, as in the code; the paper writes a soft average over all centres;
- v(x) is normalised along the feature axis; the code normalises it along the token axis, which makes the
  assignment A near-uniform, so the iterations barely move the centres;
- what follows is the model's own projector (LLaVA-1.5's mlp2x_gelu), trained by train_align.py at stage 1.
  The official extractor ends in its own Linear-QuickGELU-Linear MLP and is trained with it at stage 1 on the
  captions (lr 1e-3); here it is added, newly initialised, at stage 2 (train_selfq.py), so that every method
  continues the same stage-1 checkpoint and the --no-prototypes ablation is exactly LLaVA's LoRA model.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def pool_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, L, D) -> (N, k, D): adaptive average pooling along the token axis."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), k).transpose(1, 2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, K, D), (N, L, D) -> (N, K, L) pairwise cosine similarity."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


class PrototypeExtractor(nn.Module):
    def __init__(self, dim: int, num_prototypes: int = 256, iterations: int = 2):
        super().__init__()
        self.num_prototypes, self.iterations = num_prototypes, iterations
        self.centre = nn.Linear(dim, dim)  # c
        self.key = nn.Linear(dim, dim)  # v
        self.value = nn.Linear(dim, dim)  # f
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) patch features -> (N, L, D), each patch plus its weighted prototype."""
        values = self.value(x)  # f(x): (N, L, D)
        keys = F.normalize(self.key(x), dim=-1)  # norm(v(x)), along the feature axis: (N, L, D)
        centres = pool_tokens(x, self.num_prototypes)  # C_0: (N, K, D)
        for _ in range(self.iterations):
            centres = self.centre(centres)  # c(C): (N, K, D)
            # A: (N, K, L), each patch's softmax over the K centres
            assignment = (F.normalize(centres, dim=-1) @ keys.transpose(1, 2)).softmax(dim=1)
            centres = assignment @ values  # A f(x): (N, K, D)
        similarity = cosine(centres, x)  # cos(C, x): (N, K, L)
        # (N, K, L): 1 where centre n is patch l's nearest, n*(l) = n
        members = F.one_hot(similarity.argmax(dim=1), self.num_prototypes).transpose(1, 2).to(x.dtype)
        weight = torch.sigmoid(self.beta + self.alpha * similarity) * members  # S, kept on members: (N, K, L)
        # P: (N, K, D), the weighted mean of each centre's members' f(x), with the pooled f(x) as one more member
        prototypes = (weight @ values + pool_tokens(values, self.num_prototypes)) / (members.sum(-1, keepdim=True) + 1)
        return x + weight.transpose(1, 2) @ prototypes  # x_l + S_{n*(l) l} P_{n*(l)}: (N, L, D)
