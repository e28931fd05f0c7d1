"""APRIL-GAN (Chen et al., "A Zero-/Few-Shot Anomaly Classification and Segmentation
Method for CVPR 2023 VAND Workshop Challenge"): the method's glue. Paper, code followed,
choices and deviations with their reasons: ``README.md`` beside this file.

Patch tokens from several ViT levels go through ``ln_post`` and a per-level linear
projection into the joint image-text space and are compared with the normal/abnormal
text anchors; each level's map is the softmax probability of "abnormal" per patch
(temperature 100), upsampled, averaged over levels, then smoothed with a Gaussian
(``sigma``). Image score: the same probability for the image embedding.

Training (``linewatch train --method aprilgan``): the per-level projections are the only
trained parameters, with focal + dice on every level's map against the masks; text anchors
stay the fixed prompt ensemble. Untrained, every projection is CLIP's own ``proj``.

Few-shot: the base class's memory bank of the raw multi-level patch tokens of k normal
references (``AnomalyMethod.fit_references`` / ``memory_map``: per patch ``1 - max cosine
similarity`` to that level's memory, averaged over levels), blended with the text result by
``text_weight`` (``scoring.blend``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import segmentation_loss
from ...options import OPTIONS
from ..base import (
    CLIP_TEMPERATURE,
    AnomalyMethod,
    AnomalyScores,
    FixedAnchorTraining,
    register_method,
    upsample,
)


@register_method
class AprilGAN(FixedAnchorTraining, AnomalyMethod):
    """Multi-level patch-text similarity through trainable projections; few-shot adds a patch memory."""

    name = "aprilgan"
    Options = OPTIONS["aprilgan"]
    stages = ("projections",)
    stage_lr = {"projections": 1e-3}  # the authors' Adam rate

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        self.sigma = self.options.sigma
        proj = backbone.clip.visual.proj.detach()  # [W, D]
        self.projections = nn.ModuleList(nn.Linear(backbone.width, backbone.embed_dim) for _ in backbone.layers)
        with torch.no_grad():
            for linear in self.projections:
                linear.weight.copy_(proj.T)
                linear.bias.zero_()
        self.projections.to(backbone.device).requires_grad_(False)

    def image_outputs(self, features, anchors: torch.Tensor) -> list[torch.Tensor]:
        """Per level [B, N, 2] temperature-scaled cosine similarity to (normal, abnormal); anchors
        [2, D] or [B, 2, D]. (The image score is the untrained ``abnormal_probability`` of the
        image embedding.)"""
        locals_ = features.local_tokens or features.patch_tokens
        ln_post = self.backbone.clip.visual.ln_post
        return [CLIP_TEMPERATURE * F.normalize(linear(ln_post(tokens)), dim=-1) @ anchors.transpose(-1, -2)
                for linear, tokens in zip(self.projections, locals_)]

    def score_features(self, features, size) -> AnomalyScores:
        grid = features.grid
        image_score = self.abnormal_probability(features.image_embed)
        levels = [logits.softmax(-1)[..., 1].view(-1, *grid) for logits in self.image_outputs(features, self.anchors.stacked())]
        anomaly_map = upsample(torch.stack(levels).mean(dim=0), size)
        return self.finish_scores(anomaly_map, image_score, features, size)

    # ---- training (anchors: FixedAnchorTraining) -----------------------------------------
    def stage_parameters(self, stage):
        return list(self.projections.parameters())

    def stage_loss(self, stage, batch):
        grid, loss = batch.features.grid, 0.0
        for logits in self.image_outputs(batch.features, self.batch_anchors(batch)):  # anchors [B, 2, D]
            probability = logits.softmax(-1)[..., 1]
            loss = loss + segmentation_loss(upsample(probability.view(-1, *grid), batch.size), batch.masks)
        return {"loss": loss}
