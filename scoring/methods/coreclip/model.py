"""CoRe-CLIP's torch model (Mishra, Stricker, Rambach, arXiv 2601.22868): the layers and losses,
apart from the method's glue (``method.py``). AA-CLIP's adapter and projection forms come
from ``scoring/components/adapters.py``.

- ``GatedResidualAdapter``: the text refinement's adapter, ``x + tanh(g) A(x)``.
- ``ContextBranches`` (CSR, context-selective residuals): per branch (subject, context,
  global) residual adapters on every tapped level, projections into the joint space and an
  attention pooling into one embedding.
- ``TextConditionedFusion`` (CRM, text-conditioned compatibility reasoning):
  ``alpha = softmax_b(q . k_b / sqrt(d))``, q from the anomalous text embedding, k_b from each
  branch's embedding.
- The losses: orthogonality, consistency and grounding of (t0, t1); entropy and consistency
  of alpha; the compatibility score ``sigmoid(cos(z, t1) - cos(z, t0))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...components.adapters import ResidualAdapter, xavier_linear
from ..base import CLIP_TEMPERATURE

BRANCHES = ("subject", "context", "global")


class GatedResidualAdapter(nn.Module):
    """``x + tanh(g) * A(x) * |x| / |A(x)|`` with AA-CLIP's adapter body ``A = LeakyReLU(W x)``
    and a learnable gate ``g``, initialised so that ``tanh(g)`` is AA-CLIP's adapter weight."""

    def __init__(self, width: int, weight: float = 0.1):
        super().__init__()
        if not 0 < weight < 1:
            raise ValueError(f"adapter weight must be within (0, 1), got {weight!r}")
        self.linear = nn.Linear(width, width, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)
        self.gate = nn.Parameter(torch.tensor(math.atanh(weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.linear(x))
        out = out * x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return x + torch.tanh(self.gate) * out


class ContextBranches(nn.Module):
    """CSR after the frozen ViT: each branch owns one residual adapter per tapped level
    (AA-CLIP's form); the branches share the per-level projections into the joint space (the
    patch embeddings the maps come from) and the detection projection of the last level, whose
    patch embeddings each branch pools with its own learned query (zero: AA-CLIP's mean pooling)."""

    def __init__(self, branches: tuple[str, ...], levels: int, width: int, dim: int, adapt_weight: float = 0.1):
        super().__init__()
        self.adapters = nn.ModuleDict({b: nn.ModuleList(ResidualAdapter(width, adapt_weight) for _ in range(levels))
                                       for b in branches})
        self.seg_projections = nn.ModuleList(xavier_linear(width, dim) for _ in range(levels))
        self.det_projection = xavier_linear(width, dim)
        self.pool = nn.ParameterDict({b: nn.Parameter(torch.zeros(dim)) for b in branches})

    def forward(self, branch: str, tokens: list[torch.Tensor], ln_post: nn.Module, patches: bool = True):
        """(embedding z [B, D], per-level patch embeddings [B, N, D] or None), all L2-normalised.
        Without ``patches`` only the last level (the embedding's) is adapted."""
        adapters = self.adapters[branch]
        if not patches:
            adapters, tokens = adapters[-1:], tokens[-1:]
        levels = [ln_post(adapter(t)) for adapter, t in zip(adapters, tokens)]
        det = F.normalize(self.det_projection(levels[-1]), dim=-1)  # [B, N, D]
        weights = (det @ self.pool[branch]).softmax(dim=-1)  # [B, N]
        z = F.normalize((weights[..., None] * det).sum(1), dim=-1)
        if not patches:
            return z, None
        return z, [F.normalize(proj(x), dim=-1) for proj, x in zip(self.seg_projections, levels)]


class TextConditionedFusion(nn.Module):
    """CRM: single-head attention of the anomalous text embedding over the branch embeddings."""

    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key = xavier_linear(dim, dim), xavier_linear(dim, dim)

    def forward(self, t1: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """alpha [B, branches] from t1 [B, D] and z [B, branches, D]; each row sums to one."""
        q, k = self.query(t1), self.key(z)
        return ((k @ q[..., None])[..., 0] / math.sqrt(q.shape[-1])).softmax(dim=-1)


def fuse(alpha: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_b alpha_b v_b``, L2-normalised: alpha [B, branches], values [B, branches, ..., D]."""
    weights = alpha.view(*alpha.shape, *([1] * (values.ndim - 2)))
    return F.normalize((weights * values).sum(1), dim=-1)


def compatibility(z: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``s = sigmoid(cos(z, t1) - cos(z, t0))``: z [B, D] normalised, anchors (t0, t1) [B, 2, D]."""
    cosines = (z[:, None] * anchors).sum(-1)
    return torch.sigmoid(cosines[:, 1] - cosines[:, 0])


def patch_probability(patches: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Per patch ``softmax(100 [cos(p, t0), cos(p, t1)])[1]`` (AA-CLIP's maps): [B, N, D] -> [B, N]."""
    return (CLIP_TEMPERATURE * patches @ anchors.transpose(1, 2)).softmax(-1)[..., 1]


# ---- losses ---------------------------------------------------------------------------------

def orthogonality_loss(t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """``mean_c (t0_c . t1_c)^2`` over classes [C, D] (unit vectors): zero when every pair is orthogonal."""
    return ((t0 * t1).sum(-1) ** 2).mean()


def consistency_loss(t0: torch.Tensor, t1: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """``1 - cos(t0 + t1, e)``: the class prototype keeps the frozen encoder's class embedding ``e``."""
    return (1 - F.cosine_similarity(t0 + t1, frozen, dim=-1)).mean()


def grounding_loss(prototypes: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """``1 - cos(t0 + t1, v)`` per image: the prototype of the image's class moves towards the
    frozen image embedding ``v`` (prototypes and image embeddings [B, D])."""
    return (1 - F.cosine_similarity(prototypes, image_embeds, dim=-1)).mean()


def alpha_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the fusion weights [B, branches]; minimised, it keeps alpha from going uniform."""
    return -(alpha * alpha.clamp_min(1e-12).log()).sum(-1).mean()


def alpha_consistency(alpha: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two sets of fusion weights [B, branches]."""
    return ((alpha - other) ** 2).sum(-1).mean()


def compatibility_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the compatibility score (1 = anomalous) against the labels."""
    return F.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), labels.to(scores.dtype))

