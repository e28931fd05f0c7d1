"""MadCLIP's layers and scores (Shiri et al., MICCAI 2025, §2), apart from the method's glue
(``method.py``): the dual-branch adapter with its detection and segmentation heads, the
dual-contrast scores and the map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BranchAdapter(nn.Module):
    """Shared layer then detection and segmentation heads, all ReLU(W x), bias-free."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.shared = nn.Linear(width, dim, bias=False)
        self.det, self.seg = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = F.relu(self.shared(x))
        return F.normalize(F.relu(self.det(shared)), dim=-1), F.normalize(F.relu(self.seg(shared)), dim=-1)


def dual_scores(o_n: torch.Tensor, o_ab: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[S_n, S_ab] [..., N, 2] from the branches' normalised features [..., N, D] and the
    anchors (t_n, t_ab) [2, D] or [B, 2, D]: S_n = O_n.t_n - O_n.t_ab, S_ab = O_ab.t_ab - O_ab.t_n."""
    t = anchors.transpose(-1, -2)  # [..., D, 2]
    s_n = (o_n @ t) @ torch.tensor([1.0, -1.0], device=t.device)
    s_ab = (o_ab @ t) @ torch.tensor([-1.0, 1.0], device=t.device)
    return torch.stack([s_n, s_ab], dim=-1)


def abnormal_map(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """M = SoftMax(Interpolate(S))[ab]: per-patch [S_n, S_ab] [B, N, 2] -> [B, H, W]."""
    logits = scores.transpose(1, 2).unflatten(-1, grid)  # [B, 2, h, w]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)[:, 1]
