"""MadCLIP (Shiri et al., "MadCLIP: Few-shot Medical Anomaly Detection with CLIP", 2025).

Dual branch: at each tapped level i, a normal adapter A_n^i and an abnormal adapter
A_ab^i, each a shared layer ``ReLU(W_shared x)`` followed by two heads, detection
``ReLU(W_det .)`` and segmentation ``ReLU(W_seg .)``, mapping patch features into the text
space. Learnable prompts ``[V1..VM][normal state][object]`` and ``[W1..WM][abnormal
state][object]`` are ensembled over the prompt pack's state synonyms ("flawless {}",
"{} with flaw", ...) and the class's names into t_n and t_ab (frozen CLIP text encoder).

Per level and head, ``S_n = O_n.t_n - O_n.t_ab`` (normal branch) and
``S_ab = O_ab.t_ab - O_ab.t_n`` (abnormal branch), cosine similarities. Map
``M^i = softmax([S_n, S_ab])[ab]`` from the segmentation heads, upsampled; score
``c^i = mean over patches of softmax([S_n, S_ab])[ab]`` from the detection heads; both
averaged over levels. Loss per level: dice + focal on M^i, and the SigLIP loss on c^i
(each image's score for both prompts; every image-prompt pair is a sigmoid problem with
learnable temperature and bias), summed over levels, Adam at 1e-3 as the paper.

Deviations: MadCLIP's adapters sit inside the ViT (MVFA-style, their output fed back into
the residual stream); here they act on each tapped level's tokens after ``ln_post``, so
the frozen ViT runs once per image and its features are shared and cacheable. Logits use
CLIP's temperature 100 (as MVFA, which MadCLIP builds on). SigLIP starts at temperature 10
and bias -5, not SigLIP's -10: c^i lies in [0, 1] and each image has one positive and one
negative prompt, so 0.5 is the balanced decision point. A normal
reference memory (APRIL-GAN's) is added when references are given; the paper uses none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import dice_loss, focal_loss, siglip_loss
from ..prompts import TextAnchors
from ..training import state_digest
from .base import (
    CLIP_TEMPERATURE,
    AnomalyMethod,
    AnomalyScores,
    gaussian_blur,
    register_method,
    seeded_init,
    upsample,
)

PLACEHOLDER = "X"


class BranchAdapter(nn.Module):
    """Shared layer then detection and segmentation heads, all ReLU(linear)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.shared, self.det, self.seg = nn.Linear(width, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = F.relu(self.shared(x))
        return F.normalize(F.relu(self.det(shared)), dim=-1), F.normalize(F.relu(self.seg(shared)), dim=-1)


@register_method
class MadCLIP(AnomalyMethod):
    """Dual normal/abnormal adapters with detection and segmentation heads, learnable prompts, SigLIP."""

    name = "madclip"
    stages = ("adapters",)
    stage_lr = {"adapters": 1e-3}  # the paper's Adam rate

    def __init__(self, backbone, prompts=None, text_weight: float = 0.5, sigma: float = 4.0, context_words: int = 8):
        super().__init__(backbone, prompts, text_weight)
        if not isinstance(context_words, int) or not 1 <= context_words <= 32:
            raise ValueError(f"context_words must be within 1..32, got {context_words!r}")
        self.sigma, self.context_words = sigma, context_words
        text_width, width, dim = backbone.clip.transformer.width, backbone.width, backbone.embed_dim
        with seeded_init():
            self.text = nn.ParameterDict({state: nn.Parameter(0.02 * torch.randn(context_words, text_width))
                                          for state in ("normal", "abnormal")})
            self.adapters = nn.ModuleDict({branch: nn.ModuleList(BranchAdapter(width, dim) for _ in backbone.layers)
                                           for branch in ("normal", "abnormal")})
        self.siglip = nn.ParameterDict({"log_scale": nn.Parameter(torch.tensor(10.0).log()),
                                        "bias": nn.Parameter(torch.tensor(-5.0))})
        self.to(backbone.device).requires_grad_(False)

    # ---- text side --------------------------------------------------------------------
    def text_identity(self) -> str:
        return "madclip-prompts:" + state_digest({k: v for k, v in self.text.items()})

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        """``[V1..VM] <state phrase with the object>.`` for every state synonym and class name."""
        entry = self.prompt_pack.classes.get(class_name)
        names = (entry.names if entry and entry.names else None) or [class_name.replace("_", " ")]
        states = self.prompt_pack.states
        extra_n, extra_a = (entry.normal, entry.abnormal) if entry else ([], [])
        context = " ".join([PLACEHOLDER] * self.context_words)
        make = lambda phrases: [f"{context} {p.format(n)}." for n in names for p in phrases]  # noqa: E731
        return make(states.normal + extra_n), make(states.abnormal + extra_a)

    def encode_prompts(self, sentences: list[str], state: str) -> torch.Tensor:
        """Normalised embeddings [N, D] with the learnable words in place of the placeholders."""
        tokens = self.backbone.tokenize(sentences)
        embeddings = self.backbone.clip.token_embedding(tokens)
        context = self.text[state].unsqueeze(0).expand(len(sentences), -1, -1)
        m = self.context_words  # right after the start token, as CoOp
        embeddings = torch.cat([embeddings[:, :1], context.to(embeddings.dtype), embeddings[:, 1 + m:]], dim=1)
        return F.normalize(self.backbone.encode_tokens(tokens, embeddings=embeddings), dim=-1)

    def class_anchors(self, class_name: str) -> torch.Tensor:
        """[2, D]: t_n, t_ab, each the normalised mean over its synonym prompts."""
        return torch.stack([F.normalize(self.encode_prompts(sentences, state).mean(0), dim=-1)
                            for sentences, state in zip(self.sentences(class_name), ("normal", "abnormal"))])

    def build_anchors(self, class_name: str) -> TextAnchors:
        with torch.no_grad():
            normal, abnormal = self.class_anchors(class_name)
        return TextAnchors(normal, abnormal, self.anchor_key(class_name))

    # ---- image side -------------------------------------------------------------------
    def branch_scores(self, features, anchors: torch.Tensor):
        """Per level (det, seg), each [B, N, 2] = CLIP temperature x [S_n, S_ab]; anchors [2, D] or [B, 2, D]."""
        t = anchors.transpose(-1, -2)  # [..., D, 2]
        ln_post = self.backbone.clip.visual.ln_post
        levels = []
        for normal, abnormal, tokens in zip(self.adapters["normal"], self.adapters["abnormal"], features.patch_tokens):
            x = ln_post(tokens)
            (det_n, seg_n), (det_a, seg_a) = normal(x), abnormal(x)

            def pair(o_n, o_a):
                s_n = (o_n @ t) @ torch.tensor([1.0, -1.0], device=x.device)  # O_n.t_n - O_n.t_ab
                s_a = (o_a @ t) @ torch.tensor([-1.0, 1.0], device=x.device)  # O_ab.t_ab - O_ab.t_n
                return torch.stack([s_n, s_a], dim=-1)

            levels.append((pair(det_n, det_a), pair(seg_n, seg_a)))
        return levels

    def score_features(self, features, size) -> AnomalyScores:
        grid = features.grid
        levels = self.branch_scores(features, self.anchors.stacked())
        maps = [(CLIP_TEMPERATURE * seg).softmax(-1)[..., 1].view(-1, *grid) for _, seg in levels]
        anomaly_map = upsample(torch.stack(maps).mean(0), size)
        image_score = torch.stack([(CLIP_TEMPERATURE * det).softmax(-1)[..., 1].mean(1) for det, _ in levels]).mean(0)
        if self.memory is not None:
            anomaly_map, image_score = self.blend(anomaly_map, image_score, self.memory_map(features, size))
        return AnomalyScores(image_score, gaussian_blur(anomaly_map, self.sigma))

    # ---- training ---------------------------------------------------------------------
    def stage_parameters(self, stage):
        return [*self.text.values(), *self.adapters.parameters(), *self.siglip.values()]

    def stage_loss(self, stage, batch):
        per_class = {c: self.class_anchors(c) for c in sorted(set(batch.class_names))}
        anchors = torch.stack([per_class[c] for c in batch.class_names])  # [B, 2, D]
        grid, size, masks = batch.features.grid, batch.size, batch.masks
        dice = focal = siglip = 0.0
        for det, seg in self.branch_scores(batch.features, anchors):
            probability = upsample((CLIP_TEMPERATURE * seg).softmax(-1)[..., 1].view(-1, *grid), size)
            dice = dice + dice_loss(probability, masks)
            focal = focal + focal_loss(probability, masks)
            c_hat = (CLIP_TEMPERATURE * det).softmax(-1).mean(1)  # [B, 2]: the image's (normal, abnormal) score
            siglip = siglip + siglip_loss(c_hat, batch.labels, self.siglip["log_scale"], self.siglip["bias"])
        return {"loss": dice + focal + siglip, "dice": dice, "focal": focal, "siglip": siglip}
