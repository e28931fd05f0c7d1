"""AA-CLIP (Ma et al., "AA-CLIP: Enhancing Zero-shot Anomaly Detection via Anomaly-Aware
CLIP", CVPR 2025): the method's glue. Where the paper is silent the form is the authors' code
(github Mwxinnn/AA-CLIP: ``train.py``, ``model/adapter.py``, ``test.py``); what was read where,
every choice and deviation with its reason, and the measured tables are in ``README.md``
beside this file.

Stage ``text`` (the paper's first stage) makes the text anchors anomaly-aware: residual adapters after the first
``text_layers`` blocks of the frozen text encoder (``x <- (1 - w) x + w A(x)``, ``A`` = bias-free
linear + LeakyReLU rescaled to the token's norm: ``components.adapters.ResidualAdapter``) and a
trained text projection that replaces CLIP's (bias-free linear + LeakyReLU). Trained against
frozen visual features: per tapped level the L2-normalised patch embeddings (the V-V path's
when the backbone has one) plus the normalised class embedding; focal + dice on the
patch-text maps (temperature 100), every level's loss summed, plus the disentangle loss
``orthogonal_weight * <T_N, T_A>^2``.

Stage ``image`` (its second stage) freezes those anchors: residual adapters on each tapped level's tokens,
a bias-free projection per level into the text space (focal + dice per level, temperature
100) and a detection projection of the last level, mean-pooled, whose cross-entropy against
the labels takes the raw cosines as logits. The backbone stays frozen.

Scores: map = mean over levels of the softmax probability of "abnormal" per patch, smoothed
by ``sigma``; image score = 0.5 * (cos(det, T_A) + 1) / 2 + 0.5 * max of the map.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ...components.adapters import ResidualAdapter, xavier_linear
from ...components.anchors import ensemble_anchor
from ...losses import segmentation_loss
from ...options import OPTIONS
from ...training import state_digest
from ..base import (
    CLIP_TEMPERATURE,
    STATES,
    AnomalyMethod,
    AnomalyScores,
    register_method,
    seeded_init,
    upsample,
)


def abnormal_cosine_score(det: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """AA-CLIP's detection score ``(cos(det, T_A) + 1) / 2`` in [0, 1]; det [B, D], anchors [2, D]."""
    return (F.normalize(det, dim=-1) @ anchors[1] + 1) / 2


@register_method
class AACLIP(AnomalyMethod):
    """Anomaly-aware text anchors (stage 1), patch features aligned to them (stage 2)."""

    name = "aa-clip"
    Options = OPTIONS["aa-clip"]
    version = 2
    version_note = ("v2 follows the authors' code: image score by the abnormal cosine alone, LeakyReLU text "
                    "projection and adapters, bias-free projections, raw-cosine detection loss")
    stages = ("text", "image")
    stage_lr = {"text": 1e-5, "image": 5e-4}  # the authors' rates (their code's defaults)

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        o = self.options
        text_layers = min(o.text_layers, len(backbone.clip.transformer.resblocks))  # shallow test towers
        adapt_weight = o.adapt_weight
        self.sigma, self.orthogonal_weight, self.prompt_sample = o.sigma, o.orthogonal_weight, o.prompt_sample
        text_width, width, dim = backbone.clip.transformer.width, backbone.width, backbone.embed_dim
        with seeded_init():
            self.text = nn.ModuleDict({
                "adapters": nn.ModuleList(ResidualAdapter(text_width, adapt_weight) for _ in range(text_layers)),
                "projection": xavier_linear(text_width, dim, leaky_relu=True),
            })
            self.image = nn.ModuleDict({
                "adapters": nn.ModuleList(ResidualAdapter(width, adapt_weight) for _ in backbone.layers),
                "seg_projections": nn.ModuleList(xavier_linear(width, dim) for _ in backbone.layers),
                "det_projection": xavier_linear(width, dim),
            })
        self.to(backbone.device).requires_grad_(False)
        self._stage_anchors: dict[str, torch.Tensor] = {}

    # ---- text side --------------------------------------------------------------------
    def text_identity(self) -> str:
        return "aa-clip-text:" + state_digest({k: v for k, v in self.text.state_dict().items()})

    def _encode_sentences(self, sentences: list[str]) -> torch.Tensor:
        """Adapted text embeddings [N, D], L2-normalised (differentiable)."""
        adapters = self.text["adapters"]

        def after_block(index, x):
            return adapters[index](x) if index < len(adapters) else x

        embeds = self.backbone.encode_tokens(self.backbone.tokenize(sentences), after_block=after_block,
                                             projection=self.text["projection"])
        return F.normalize(embeds, dim=-1)

    def encode_prompts(self, class_name: str, state: str, sample: random.Random | None = None) -> torch.Tensor:
        """[D]: the normalised mean of the state's adapted sentence embeddings; with ``sample``
        (the text stage) up to ``prompt_sample`` sentences drawn, with a graph."""
        sentences = self.prompt_pack.prompts(class_name)[STATES.index(state)]
        return ensemble_anchor(self._encode_sentences, sentences, sample, self.prompt_sample)

    def class_anchors(self, class_name: str, sample: random.Random | None = None) -> torch.Tensor:
        """[2, D] (normal, abnormal): each state's ``encode_prompts``, drawing from ``sample``."""
        return torch.stack([self.encode_prompts(class_name, state, sample) for state in STATES])

    # ---- image side -------------------------------------------------------------------
    def _adapted_levels(self, features) -> list[torch.Tensor]:
        ln_post = self.backbone.clip.visual.ln_post
        return [ln_post(adapter(tokens)) for adapter, tokens in zip(self.image["adapters"], features.patch_tokens)]

    def image_outputs(self, features, anchors: torch.Tensor):
        """Per-level patch logits [B, N, 2] (temperature 100) and the detection embedding [B, D]
        (normalised, mean-pooled over the last level's patches); ``anchors`` [2, D] or [B, 2, D]."""
        anchors_t = anchors.transpose(-1, -2)
        levels = self._adapted_levels(features)
        patch = [CLIP_TEMPERATURE * F.normalize(proj(t), dim=-1) @ anchors_t
                 for proj, t in zip(self.image["seg_projections"], levels)]
        det = F.normalize(self.image["det_projection"](levels[-1]), dim=-1).mean(1)
        return patch, det

    def score_features(self, features, size) -> AnomalyScores:
        anchors = self.anchors.stacked()
        patch, det = self.image_outputs(features, anchors)
        grid = features.grid
        anomaly_map = upsample(torch.stack([p.softmax(-1)[..., 1].view(-1, *grid) for p in patch]).mean(0), size)
        image_score = 0.5 * abnormal_cosine_score(det, anchors) + 0.5 * anomaly_map.flatten(1).amax(1)
        return self.finish_scores(anomaly_map, image_score, features, size)

    # ---- training ---------------------------------------------------------------------
    def begin_stage(self, stage, class_names):
        self._sample = random.Random(0)
        if stage == "image":  # stage-1 anchors are frozen from here on
            with torch.no_grad():
                self._stage_anchors = {c: self.class_anchors(c) for c in class_names}

    def stage_parameters(self, stage):
        return list((self.text if stage == "text" else self.image).parameters())

    def stage_loss(self, stage, batch):
        grid, size, masks = batch.features.grid, batch.size, batch.masks
        if stage == "text":
            per_class = {c: self.class_anchors(c, self._sample) for c in sorted(set(batch.class_names))}
            anchors = torch.stack([per_class[c] for c in batch.class_names])  # [B, 2, D]
            image = F.normalize(batch.features.image_embed, dim=-1)[:, None]
            seg = 0.0
            for embeds in batch.features.patch_embeds:  # the V-V path's when the backbone has one
                f = F.normalize(embeds, dim=-1) + image  # not normalised again, as the authors
                probability = (CLIP_TEMPERATURE * f @ anchors.transpose(1, 2)).softmax(-1)[..., 1]
                seg = seg + segmentation_loss(upsample(probability.view(-1, *grid), size), masks)
            orthogonal = torch.stack([(a[0] * a[1]).sum() for a in per_class.values()]).mean() ** 2
            return {"loss": seg + self.orthogonal_weight * orthogonal, "seg": seg, "orthogonal": orthogonal}
        anchors = torch.stack([self._stage_anchors[c] for c in batch.class_names])
        patch, det = self.image_outputs(batch.features, anchors)
        seg = sum(segmentation_loss(upsample(p.softmax(-1)[..., 1].view(-1, *grid), size), masks) for p in patch)
        cls = F.cross_entropy((det.unsqueeze(1) @ anchors.transpose(1, 2)).squeeze(1), batch.labels)  # raw cosines
        return {"loss": seg + cls, "seg": seg, "cls": cls}

    def end_training(self):
        super().end_training()
        self._stage_anchors = {}
