"""AA-CLIP's adapter and projection forms (Ma et al., CVPR 2025; the authors' ``SimpleAdapter``
and ``SimpleProj``, github Mwxinnn/AA-CLIP). Users: ``aa-clip`` (text and
image adapters, projections) and ``core-clip`` (its CSR branches and CRM projections, which
take AA-CLIP's forms where its paper gives none)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualAdapter(nn.Module):
    """AA-CLIP's residual adapter: ``(1 - w) x + w * A(x) * |x| / |A(x)|``, A = LeakyReLU(W x)."""

    def __init__(self, width: int, weight: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.linear(x))
        out = out * x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return (1 - self.weight) * x + self.weight * out


def xavier_linear(fan_in: int, fan_out: int, leaky_relu: bool = False) -> nn.Module:
    """The authors' ``SimpleProj``: bias-free linear (xavier init), LeakyReLU after it when asked."""
    linear = nn.Linear(fan_in, fan_out, bias=False)
    nn.init.xavier_uniform_(linear.weight)
    return nn.Sequential(linear, nn.LeakyReLU()) if leaky_relu else linear
