"""APRIL-GAN (Chen et al., "A Zero-/Few-Shot Anomaly Classification and Segmentation
Method for CVPR 2023 VAND Workshop Challenge").

Zero-shot: patch tokens from several ViT levels are mapped into the joint image-text
space and compared with the normal/abnormal text anchors; each level's map is the
softmax probability of "abnormal" per patch, upsampled and combined over levels, then
smoothed with a Gaussian (sigma 4, as the paper's evaluation). Image score: the same
probability for the image embedding.

Few-shot: a memory bank of the raw multi-level patch tokens of k normal references;
each patch's score is ``1 - max cosine similarity`` to that level's memory, combined over
levels and added to the zero-shot map.

Deviations, until the training issue lands: the paper's per-level linear projections
are trained on an auxiliary dataset; here every level uses CLIP's own ``ln_post`` and
``proj`` (what a trained projection starts from). Levels are averaged rather than summed
and zero- and few-shot maps are averaged rather than added (the same ranking, maps stay
in [0, 1]); few-shot image score = mean of the zero-shot image score and the few-shot
map's maximum, as WinCLIP+. ``text_weight`` moves both balances (default 0.5).
"""

from __future__ import annotations

import torch

from .base import AnomalyMethod, AnomalyScores, gaussian_blur, nearest_distance, register_method, upsample


@register_method
class AprilGAN(AnomalyMethod):
    """Multi-level patch-text similarity; few-shot adds a multi-level patch memory."""

    name = "aprilgan"

    def __init__(self, backbone, prompts=None, text_weight: float = 0.5, sigma: float = 4.0):
        super().__init__(backbone, prompts, text_weight)
        if not isinstance(sigma, (int, float)) or sigma < 0:
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}")
        self.sigma = sigma
        self.memory: list[torch.Tensor] | None = None

    def fit_references(self, images: torch.Tensor | None) -> None:
        if images is None:
            self.memory = None
            return
        levels = [self.backbone(chunk).patch_tokens for chunk in images.split(8)]
        self.memory = [torch.cat([per_chunk[i] for per_chunk in levels]).flatten(0, 1) for i in range(len(levels[0]))]

    def project_patches(self, patch_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-level mapping into the text space (identity over CLIP's projection for now)."""
        return patch_embeds

    def score_batch(self, images: torch.Tensor) -> AnomalyScores:
        features = self.backbone(images)
        size, grid = images.shape[-2:], features.grid
        image_score = self.abnormal_probability(features.image_embed)
        levels = [self.abnormal_probability(e).view(-1, *grid) for e in self.project_patches(features.patch_embeds)]
        anomaly_map = upsample(torch.stack(levels).mean(dim=0), size)
        if self.memory is not None:
            few_shot = torch.stack([nearest_distance(tokens, memory).view(-1, *grid)
                                    for tokens, memory in zip(features.patch_tokens, self.memory)]).mean(dim=0)
            anomaly_map, image_score = self.blend(anomaly_map, image_score, upsample(few_shot, size))
        return AnomalyScores(image_score, gaussian_blur(anomaly_map, self.sigma))
