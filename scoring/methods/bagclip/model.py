"""BAG-CLIP's trained parts (Wu, Zhang and Li, Electronics 15(8) 1659, 2026; pure torch, no I/O;
the glue is ``method.py``): squeeze-and-excitation channel gates (SAFR, §3.2.1), the
adaptive-bandwidth kNN graph over the patches (SAG's graph construction, §3.3), a stack of
graph convolutions (§3.4), and ``BagClipModel``, which joins them with JFF's per-level
projections (§3.5) and the global map (§3.2.2).

Everything is batched: tokens are ``[B, N, C]`` and one image's patches never see another's;
the graph is one distance matrix and one top-k over the whole batch, no loop over images.
Adjacencies are dense ``[B, N, N]``: at N = 1369 (518 px, ViT-L/14) that is 7.5 MB per image in
fp32, which the paper's 67 MB peak for graph construction (Table 4) also suggests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import CLIP_TEMPERATURE


class SqueezeExcitation(nn.Module):
    """Channel gates ``sigmoid(W2 relu(W1 mean_N(x)))`` [B, C] and ``x * gates`` (Hu et al.;
    BAG-CLIP's SAFR, §3.2.1): bias-free, as the paper's formula. ``W2`` starts at zero, so every
    gate starts at exactly 0.5, a uniform scale: recalibration begins as a no-op on directions
    and learns from there (gradients reach ``W1`` after the first step)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.squeeze = nn.Linear(channels, max(1, channels // reduction), bias=False)  # W1
        self.excite = nn.Linear(self.squeeze.out_features, channels, bias=False)  # W2
        nn.init.zeros_(self.excite.weight)

    def gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, C] in (0, 1), from the patches' global average (GAP)."""
        return torch.sigmoid(self.excite(F.relu(self.squeeze(tokens.mean(dim=1)))))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.gates(tokens)[:, None]


def resolve_neighbours(neighbours: float, nodes: int) -> int:
    """K for a graph of ``nodes`` nodes: an int is absolute, a float in (0, 1) a share of the
    nodes (rounded, at least 2). Capped at ``nodes - 1`` (small grids)."""
    k = neighbours if isinstance(neighbours, int) else max(2, round(neighbours * nodes))
    return max(0, min(k, nodes - 1))


def knn_affinities(nodes: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """Directed adjacency [B, N, N] of BAG-CLIP's SAG (§3.3) from node features [B, N, D].

    Per node i, among its K nearest other nodes (Euclidean): sigma_i = distance to the K-th,
    ``S_ij = exp(-|h_i - h_j|^2 / (sigma_i sigma_j))`` and ``A_ij = ReLU(S_ij - tau_i)`` with
    tau_i = S at the K-th neighbour. So at most K - 1 neighbours per row carry weight (the K-th
    sits at the threshold), fewer where a near node's own bandwidth is small; no self-loops.
    Differentiable in the features (the top-k choice is not)."""
    batch, count, _ = nodes.shape
    if k < 1:
        return nodes.new_zeros(batch, count, count)
    distance = torch.cdist(nodes, nodes)  # [B, N, N], one over the batch
    self_pairs = torch.eye(count, dtype=torch.bool, device=nodes.device)
    nearest, index = distance.masked_fill(self_pairs, float("inf")).topk(k, dim=-1, largest=False)  # ascending
    sigma = nearest[..., -1].clamp_min(eps)  # [B, N]: distance to the K-th neighbour
    sigma_j = sigma.gather(1, index.flatten(1)).view(batch, count, k)
    affinity = torch.exp(-nearest.square() / (sigma[..., None] * sigma_j))  # S_ij of the K nearest
    weight = F.relu(affinity - affinity[..., -1:])  # soft threshold at the K-th neighbour's affinity
    return weight.new_zeros(batch, count, count).scatter(2, index, weight)  # fp32 under autocast, as cdist


def normalised_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """``D^-1/2 (A + A^T + I) D^-1/2`` [B, N, N]: symmetrised, self-loops, symmetric
    normalisation with D the row sums (§3.3). Every degree is >= 1, so no division by zero."""
    loops = torch.eye(adjacency.shape[-1], dtype=adjacency.dtype, device=adjacency.device)
    full = adjacency + adjacency.transpose(1, 2) + loops
    scale = full.sum(dim=-1).rsqrt()
    return scale[..., :, None] * full * scale[..., None, :]


class GraphConvolution(nn.Module):
    """``layers`` graph convolutions ``F <- ReLU(A_norm F W_p)`` at one width (Kipf & Welling;
    §3.4), bias-free as the formula, He-initialised for the ReLUs so five layers neither vanish
    nor blow up at the start."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def forward(self, features: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            features = F.relu(adjacency @ layer(features))
        return features


class BagClipModel(nn.Module):
    """The trained parts: SAFR, the reduction and GCN of SAG, JFF's per-level projections and the
    global map. Inputs are ln_post'ed level tokens [B, N, W] and CLIP's image embedding [B, D]."""

    def __init__(self, width: int, levels: int, embed_dim: int, proj: torch.Tensor, neighbours: float = 15,
                 gcn_layers: int = 5, graph_width: int = 464, reduction: int = 16, safr: bool = True):
        super().__init__()
        channels = levels * width
        self.width, self.neighbours = width, neighbours
        self.safr = SqueezeExcitation(channels, reduction) if safr else None
        self.reduce = nn.Linear(channels, graph_width, bias=False) if gcn_layers else None
        self.gcn = GraphConvolution(graph_width, gcn_layers) if gcn_layers else None
        fused = width + (graph_width if gcn_layers else 0)
        self.fusion = nn.ModuleList(nn.Linear(fused, embed_dim, bias=False) for _ in range(levels))
        self.global_projection = nn.Linear(embed_dim, embed_dim, bias=False)
        with torch.no_grad():
            for linear in self.fusion:  # [CLIP's proj; 0]: the zero-shot path until the graph's share is learnt
                linear.weight.zero_()
                linear.weight[:, :width].copy_(proj.T)
            self.global_projection.weight.copy_(torch.eye(embed_dim))

    def detail(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """x_detail [B, N, levels x W]: the levels side by side, SAFR-recalibrated."""
        x = torch.cat(levels, dim=-1)
        return self.safr(x) if self.safr is not None else x

    def graph(self, detail: torch.Tensor) -> torch.Tensor:
        """F_SAG [B, N, graph_width]."""
        nodes = self.reduce(detail)
        k = resolve_neighbours(self.neighbours, nodes.shape[1])
        return self.gcn(nodes, normalised_adjacency(knn_affinities(nodes, k)))

    def forward(self, levels: list[torch.Tensor], image_embed: torch.Tensor):
        """(per level [B, N, D], global [B, D]), all L2-normalised."""
        detail = self.detail(levels)
        per_level = detail.split(self.width, dim=-1)
        if self.gcn is not None:
            context = self.graph(detail)
            per_level = [torch.cat([x, context], dim=-1) for x in per_level]
        embeds = [F.normalize(linear(x), dim=-1) for linear, x in zip(self.fusion, per_level)]
        return embeds, F.normalize(self.global_projection(image_embed), dim=-1)

    def parameter_counts(self) -> dict[str, int]:
        parts = {"safr": self.safr, "reduction": self.reduce, "gcn": self.gcn, "fusion": self.fusion,
                 "global": self.global_projection}
        return {name: sum(p.numel() for p in part.parameters()) if part is not None else 0
                for name, part in parts.items()}


def abnormal_share(embeds: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """softmax over (T_N, T_A) of 100 x cosine, abnormal side: embeds normalised [B, N, D] or
    [B, D]; anchors [2, D], or [B, 2, D] per image (training batches mix classes)."""
    flat = embeds.ndim == 2
    logits = CLIP_TEMPERATURE * (embeds[:, None] if flat else embeds) @ anchors.transpose(-1, -2)
    share = logits.softmax(-1)[..., 1]
    return share[:, 0] if flat else share
