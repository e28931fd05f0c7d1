"""The training losses the seed papers share: focal and dice on anomaly maps, MadCLIP's
per-patch SigLIP on image-text scores, KAnoCLIP's knowledge loss on text embeddings. Maps are probabilities in [0, 1]; masks are {0, 1} floats, same shape."""

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


def siglip_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MadCLIP's sigmoid loss (Zhai et al.'s SigLIP, as the authors' ``loss.py LossSigmoid``):
    each patch's pair ``[S_n, S_ab]`` [B, N, 2] is two binary problems, "matches the normal
    prompt" and "matches the abnormal prompt", signed by the image's label (``labels`` [B],
    1 = anomalous): ``-mean_B sum_k mean_N log sigmoid(sign_k S_k)`` with sign = (-y, y),
    y = 2 label - 1. No temperature or bias: the scores are cosine differences in [-2, 2]."""
    y = 2 * labels.to(scores.dtype) - 1
    sign = torch.stack([-y, y], dim=-1)[:, None, :]  # [B, 1, 2]
    return -F.logsigmoid(sign * scores).mean(1).sum(-1).mean()


def knowledge_loss(knowledge: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """KAnoCLIP's L_KD (eq. 2): ``max(0, d(k, a) - d(k, n))`` with d the Euclidean distance
    between L2-normalised embeddings [..., D]: the knowledge k must lie nearer the learned
    abnormal prompt a than the learned normal one n. Zero once it does; averaged over rows."""
    k, n, a = (F.normalize(x.float(), dim=-1) for x in (knowledge, normal, abnormal))
    return F.relu((k - a).norm(dim=-1) - (k - n).norm(dim=-1)).mean()
