"""The prototype extractor of SQ-LLaVA (Sun et al., ECCV 2024), between the vision features and the projector.

It clusters an image's patch features x (N, L, D) into K prototypes and adds to every patch the prototype of
its cluster, so the projector sees each patch together with what the image holds that resembles it:

    C_0 = avgpool_K(x)                                  K centres pooled along the token axis
    for T iterations:  C <- c(C);  A = softmax_K(norm(C) norm(v(x))^T);  C <- A f(x)
    S = sigmoid(beta + alpha cos(C, x))                 (K, L) similarity, alpha = 1, beta = 0 learnable
    n*(l) = argmax_n cos(C_n, x_l)                      each patch's nearest centre (hard assignment)
    P_n = (sum_{l: n*(l) = n} S_nl f(x_l) + avgpool_K(f(x))_n) / (|{l: n*(l) = n}| + 1)
    x'_l = x_l + S_{n*(l) l} P_{n*(l)}

c, v and f are Linear(D, D) (3.15M parameters at D = 1024); the token count is unchanged. It is trained with
the projector from stage 1 on (train_align.py --prototypes K, as the official scripts/pretrain_clu.sh does at
lr 1e-3), and train_selfq.py continues it. Where this differs from the paper or the official code
(heliossun/SQ-LLaVA, sqllava/model/multimodal_projector/cluster.py), and why:
- the nearest centre is a hard assignment, as in the code; the paper writes a soft average over all centres;
- v(x) is normalised along the feature axis (`key_norm="feature"`): each patch's key is a unit vector, so A
  holds cosines between centres and patches. The code normalises along the token axis (`key_norm="token"`,
  `train_align.py --prototype_norm token`): each feature channel is scaled to unit norm over the image's
  patches. The feature axis was chosen on the view that the token axis keeps A near-uniform; the
  measurement below does not bear that view out;
- what follows is the model's own projector (LLaVA-1.5's mlp2x_gelu); the official extractor ends in its own
  Linear-QuickGELU-Linear MLP, which plays the same part.
Neither axis puts a temperature on the logits of A. Along the feature axis they are cosines in [-1, 1], so a
patch's largest weight is at most e / (e + (K - 1) / e), 0.51 at K = 8 and 0.028 at K = 256, whatever
training does; along the token axis a key's length is free. A new extractor assigns uniformly under either
axis (1 - H / log K below 1e-3); on the shapes world training moved the token axis's assignment further
from uniform than the feature axis's at stage 2 (data/prototype_entropy.py, results/prototype_entropy.md).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

KEY_NORMS = ("feature", "token")  # the axis of v(x) (N, L, D) along which it is normalised: D or L


def pool_tokens(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, L, D) -> (N, k, D): adaptive average pooling along the token axis."""
    return F.adaptive_avg_pool1d(x.transpose(1, 2), k).transpose(1, 2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, K, D), (N, L, D) -> (N, K, L) pairwise cosine similarity."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


class PrototypeExtractor(nn.Module):
    def __init__(self, dim: int, num_prototypes: int = 256, iterations: int = 2, key_norm: str = "feature"):
        super().__init__()
        if key_norm not in KEY_NORMS:
            raise ValueError(f"key_norm must be one of {KEY_NORMS}, got {key_norm!r}")
        self.num_prototypes, self.iterations, self.key_norm = num_prototypes, iterations, key_norm
        self.centre = nn.Linear(dim, dim)  # c
        self.key = nn.Linear(dim, dim)  # v
        self.value = nn.Linear(dim, dim)  # f
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def cluster(self, x: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, L, D) features and their f(x) -> the refined centres C (N, K, D) and each iteration's soft
        assignment A (N, K, L), a softmax over the K centres for every patch."""
        keys = F.normalize(self.key(x), dim=-1 if self.key_norm == "feature" else -2)  # norm(v(x)): (N, L, D)
        centres = pool_tokens(x, self.num_prototypes)  # C_0: (N, K, D)
        assignments = []
        for _ in range(self.iterations):
            centres = self.centre(centres)  # c(C): (N, K, D)
            assignments.append((F.normalize(centres, dim=-1) @ keys.transpose(1, 2)).softmax(dim=1))  # A: (N, K, L)
            centres = assignments[-1] @ values  # A f(x): (N, K, D)
        return centres, assignments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, D) patch features -> (N, L, D), each patch plus its weighted prototype."""
        values = self.value(x)  # f(x): (N, L, D)
        centres, _ = self.cluster(x, values)
        similarity = cosine(centres, x)  # cos(C, x): (N, K, L)
        # (N, K, L): 1 where centre n is patch l's nearest, n*(l) = n
        members = F.one_hot(similarity.argmax(dim=1), self.num_prototypes).transpose(1, 2).to(x.dtype)
        weight = torch.sigmoid(self.beta + self.alpha * similarity) * members  # S, kept on members: (N, K, L)
        # P: (N, K, D), the weighted mean of each centre's members' f(x), with the pooled f(x) as one more member
        prototypes = (weight @ values + pool_tokens(values, self.num_prototypes)) / (members.sum(-1, keepdim=True) + 1)
        return x + weight.transpose(1, 2) @ prototypes  # x_l + S_{n*(l) l} P_{n*(l)}: (N, L, D)
