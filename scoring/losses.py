"""The training losses the seed papers share: focal and dice on anomaly maps, SigLIP on
image-text pairs. Maps are probabilities in [0, 1]; masks are {0, 1} floats, same shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probability: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss (Lin et al.) of per-pixel abnormal probabilities against the mask:
    the many easy normal pixels weigh little, so the few defect pixels are not drowned."""
    p = probability.clamp(eps, 1 - eps)
    p_true = torch.where(mask > 0.5, p, 1 - p)
    return (-(1 - p_true) ** gamma * p_true.log()).mean()


def dice_loss(probability: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged; ``eps`` keeps all-normal images (empty masks) defined."""
    p, m = probability.flatten(1), mask.flatten(1)
    return (1 - (2 * (p * m).sum(1) + eps) / (p.sum(1) + m.sum(1) + eps)).mean()


def segmentation_loss(probability: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Focal + dice on the abnormal map and dice on the normal map, as APRIL-GAN and AA-CLIP train."""
    return focal_loss(probability, mask) + dice_loss(probability, mask) + dice_loss(1 - probability, 1 - mask)


def siglip_loss(similarity: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid image-text loss (Zhai et al.): every (image, text) pair is its own binary
    problem, so one text may match many images. ``similarity`` [B, T]; ``labels`` [B] index
    the matching text; ``scale`` is the log temperature."""
    sign = 2 * F.one_hot(labels.long(), similarity.shape[1]).to(similarity.dtype) - 1
    return -F.logsigmoid(sign * (scale.exp() * similarity + bias)).sum(1).mean()
