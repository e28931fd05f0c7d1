"""BAG-CLIP (Wu, Zhang and Li, "BAG-CLIP: Bifurcated Attention Graph-Enhanced CLIP for
Zero-Shot Industrial Anomaly Detection", Electronics 15(8) 1659, 2026), the power-line paper:
the method's glue; the trained parts are in ``model.py``. The authors released no code; where
§3 is silent or contradicts itself the choices are ours, each with its reason in
``README.md`` beside this file (with the measurements). The frozen CLIP runs once per image;
everything trained reads its tapped levels (cached features train on a CPU).

- Detail-preserving branch (BSA, §3.2.1): the tapped levels' patch tokens, each through CLIP's
  frozen ``ln_post``, concatenated channel-wise (C = levels x width) and recalibrated by SAFR,
  squeeze-and-excitation with reduction ``reduction``: ``x_detail = x * sigmoid(W2 relu(W1 GAP(x)))``.
- SAG (§3.3-3.4): ``F0 = x_detail R`` (a bias-free C -> ``graph_width`` reduction); the patches
  of each image are the nodes of a graph built on F0: ``neighbours`` (K) nearest, adaptive
  bandwidth sigma_i = distance to the K-th, ``S_ij = exp(-|f_i - f_j|^2 / (sigma_i sigma_j))``,
  weights ``ReLU(S_ij - tau_i)`` with tau_i = S at the K-th neighbour, symmetrised, self-loops,
  ``D^-1/2 A D^-1/2``; then ``gcn_layers`` (P) graph convolutions ``F <- ReLU(A F W_p)`` give F_SAG.
- JFF (§3.5) per tapped level l: ``[x_detail^(l), F_SAG] W_proj^(l)``, L2-normalised, compared
  with the fixed prompt ensemble's T_N / T_A at temperature 100; map = mean over levels of the
  softmax's abnormal share, upsampled and smoothed (``sigma``).
- Global branch (§3.2.2): CLIP's own class embedding through one trained linear map, same
  comparison. Image score = 0.5 p_global + 0.5 max(map).
- Loss (§3.6): focal on p_global + (focal + dice(abnormal) + dice(normal)) on the
  level-averaged map, lambda = 1; Adam at 1e-3 (§4.1.3).
- Ablations (Table 3): ``gcn_layers = 0`` removes SAG, ``safr = false`` removes SAFR.
"""

from __future__ import annotations

import torch

from ...losses import focal_loss, segmentation_loss
from ...options import OPTIONS
from ..base import (
    AnomalyMethod,
    AnomalyScores,
    FixedAnchorTraining,
    register_method,
    seeded_init,
    upsample,
)
from .model import BagClipModel, abnormal_share


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

    def image_outputs(self, features, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(level-averaged abnormal map on the patch grid [B, h, w], global abnormal share [B]);
        anchors [2, D] or [B, 2, D]."""
        ln_post = self.backbone.clip.visual.ln_post
        levels, image = self.model([ln_post(t) for t in features.local_tokens or features.patch_tokens],
                                   features.image_embed)
        grid_map = torch.stack([abnormal_share(z, anchors) for z in levels]).mean(0).view(-1, *features.grid)
        return grid_map, abnormal_share(image, anchors)

    def score_features(self, features, size) -> AnomalyScores:
        grid_map, global_score = self.image_outputs(features, self.anchors.stacked())
        anomaly_map = upsample(grid_map, size)
        image_score = 0.5 * global_score + 0.5 * anomaly_map.flatten(1).amax(1)
        return self.finish_scores(anomaly_map, image_score, features, size)

    # ---- training (anchors: FixedAnchorTraining) -----------------------------------------
    def stage_parameters(self, stage):
        return list(self.model.parameters())

    def stage_loss(self, stage, batch):
        grid_map, global_score = self.image_outputs(batch.features, self.batch_anchors(batch))
        seg = segmentation_loss(upsample(grid_map, batch.size), batch.masks)
        cls = focal_loss(global_score, batch.labels.float())
        return {"loss": cls + seg, "seg": seg, "cls": cls}
