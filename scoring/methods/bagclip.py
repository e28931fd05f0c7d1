"""BAG-CLIP (Wu, Zhang and Li, "BAG-CLIP: Bifurcated Attention Graph-Enhanced CLIP for
Zero-Shot Industrial Anomaly Detection", Electronics 15(8) 1659, 2026), the power-line paper.

The authors released no code (searched: code, issues and pages indexes, GitHub repository
names; the paper's data statement links datasets only), so where §3 is silent the choices
below are ours, each named. The frozen CLIP runs once per image; everything trained reads its
tapped levels (cached features train on a CPU).

Detail-preserving branch (BSA, §3.2.1): the tapped levels' patch tokens, each through CLIP's
frozen ``ln_post``, are concatenated channel-wise (C = levels x width) and recalibrated by SAFR,
squeeze-and-excitation with reduction r = 16: ``x_detail = x * sigmoid(W2 relu(W1 GAP(x)))``.

SAG (§3.3-3.4): ``F0 = x_detail R`` (a bias-free C -> ``graph_width`` reduction), the patches of
each image are the nodes of a graph built on F0: K nearest neighbours, adaptive bandwidth
sigma_i = distance to the K-th, ``S_ij = exp(-|f_i - f_j|^2 / (sigma_i sigma_j))``, weights
``ReLU(S_ij - tau_i)`` with tau_i = S at the K-th neighbour, symmetrised, self-loops,
``D^-1/2 A D^-1/2``; then P graph convolutions ``F <- ReLU(A F W_p)`` give F_SAG
(``scoring/graph_layers.py``; one distance matrix and top-k for the whole batch).

JFF (§3.5) per tapped level l: ``[x_detail^(l), F_SAG] W_proj^(l)``, L2-normalised, compared with
the fixed prompt ensemble's T_N / T_A at temperature 100; map = mean over levels of the
softmax's abnormal share, upsampled and smoothed (``sigma``). Global branch (§3.2.2): CLIP's
own class embedding through one trained linear map, same comparison. Image score
= 0.5 p_global + 0.5 max(map). Loss (§3.6): focal on p_global + (focal + dice(abnormal) +
dice(normal)) on the level-averaged map, lambda = 1; Adam, 5 epochs at 1e-3 (§4.1.3).

The paper's open questions, resolved by its parameter counts (Tables 4 and 5):
- Width before the GCN: Table 4 gives the 5-layer GCN 1.08 M parameters. Five layers at the
  concatenated width (4 x 1024 at ViT-L) would be 84 M, at one level's 1024 5.2 M; so the width
  is reduced before the GCN, to ``graph_width`` = 464: 5 x 464^2 = 1,076,480 = 1.08 M (§3.4's
  per-layer W^(p), no bias). Table 4's FLOPs (7.18 G = 5 x 1369 x 1024^2 multiply-adds) fit
  five 1024-wide layers instead: the table contradicts itself; we follow its parameter count.
- W_phi: Table 4 and §4.4 ("does not require the introduction of additional learnable
  parameters") say graph construction has none, so W_phi = I: distances are taken on F0, the
  reduced features the GCN reads, whose reduction R (trained) is where §3.3's "learnable
  metric that mitigates the curse of dimensionality" lives.
- Global branch: the "standard Transformer block" equations of §3.2.2 are the encoder's own
  final blocks (frozen); trained is one linear map of the class embedding, identity at start,
  by L_CLS. A trained Transformer block would alone be 12.6 M at ViT-L, the paper's whole
  13 M budget (Table 5), leaving nothing for SAFR (2.1 M) and the GCN (1.08 M).
- Count at ViT-L-14-336, 4 levels: SAFR 2.10 M, reduction 1.90 M, GCN 1.08 M, JFF 4.57 M,
  global 0.59 M: 10.2 M trained, against Table 5's 13 M (the paper does not itemise it).

Other choices and deviations (ours, each with its reason):
- K: ``neighbours`` is absolute by default (15, the paper's count, tuned as a count in its
  Fig. 5 at 1369 nodes); a float in (0, 1) is a share of the grid. The share that matches at
  518 px (1.1 %) gives K = 2 at 224 px, one weighted neighbour per node. K is capped at N - 1.
- Edges only among each node's K nearest (the paper's kNN), weighted by the soft threshold;
  the formula gives the K-th neighbour weight 0, so at most K - 1 neighbours per row.
- Initialisation (the paper is silent): SAFR's W2 = 0 (gates 0.5, a uniform scale), each
  W_proj^(l) = [CLIP's proj; 0] and the global map = I, so the untrained method scores exactly
  as zero-shot CLIP (APRIL-GAN's untrained maps) and the graph's share grows from zero; the
  reduction is PyTorch's default, the GCN He-initialised (five ReLU layers keep their scale).
- The map is supervised after level averaging (§3.6: "the model's output map"), not per level.
- Composition of the image score (equal weights, the sum halved to stay in [0, 1]) and the
  smoothing (sigma 4 px, AnomalyCLIP's test.py) are not in the paper's text; the paper preset's
  batch 8 and Adam betas (0.5, 0.999) are AnomalyCLIP's train.py (github zqhang/AnomalyCLIP),
  whose other defaults (518 px, layers 6/12/18/24, lr 1e-3) the paper's settings repeat.
- ``memory_bank`` (true in the cpu preset) adds APRIL-GAN's normal reference memory when
  references are given; the paper is zero-shot (false in the paper preset).
- ``gcn_layers = 0`` removes SAG (JFF projects the detail features alone) and ``safr = false``
  removes SAFR: the paper's ablations (Table 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph_layers import GraphConvolution, SqueezeExcitation, knn_affinities, normalised_adjacency, resolve_neighbours
from ..losses import focal_loss, segmentation_loss
from ..options import OPTIONS
from .base import (
    CLIP_TEMPERATURE,
    AnomalyMethod,
    AnomalyScores,
    FixedAnchorTraining,
    register_method,
    seeded_init,
    upsample,
)


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


@register_method
class BagCLIP(FixedAnchorTraining, AnomalyMethod):
    """SAFR-recalibrated multi-level details, a kNN graph over the patches (SAG), joint fusion (JFF)."""

    name = "bag-clip"
    Options = OPTIONS["bag-clip"]
    stages = ("head",)
    stage_lr = {"head": 1e-3}  # paper §4.1.3

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        o = self.options
        self.sigma = o.sigma
        with seeded_init():
            self.model = BagClipModel(backbone.width, len(backbone.layers), backbone.embed_dim,
                                      backbone.clip.visual.proj.detach(), o.neighbours, o.gcn_layers, o.graph_width,
                                      o.reduction, o.safr)
        self.model.to(backbone.device).requires_grad_(False)

    def outputs(self, features, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(level-averaged abnormal map on the patch grid [B, h, w], global abnormal share [B])."""
        ln_post = self.backbone.clip.visual.ln_post
        levels, image = self.model([ln_post(t) for t in features.local_tokens or features.patch_tokens],
                                   features.image_embed)
        grid_map = torch.stack([abnormal_share(z, anchors) for z in levels]).mean(0).view(-1, *features.grid)
        return grid_map, abnormal_share(image, anchors)

    def score_features(self, features, size) -> AnomalyScores:
        grid_map, global_score = self.outputs(features, self.anchors.stacked())
        anomaly_map = upsample(grid_map, size)
        image_score = 0.5 * global_score + 0.5 * anomaly_map.flatten(1).amax(1)
        return self.finish_scores(anomaly_map, image_score, features, size)

    # ---- training (anchors: FixedAnchorTraining) -----------------------------------------
    def stage_parameters(self, stage):
        return list(self.model.parameters())

    def stage_loss(self, stage, batch):
        grid_map, global_score = self.outputs(batch.features, self.batch_anchors(batch))
        seg = segmentation_loss(upsample(grid_map, batch.size), batch.masks)
        cls = focal_loss(global_score, batch.labels.float())
        return {"loss": cls + seg, "seg": seg, "cls": cls}
