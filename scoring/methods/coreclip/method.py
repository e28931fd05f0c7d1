"""CoRe-CLIP (Mishra, Stricker, Rambach, "When Anomalies Depend on Context: Learning
Conditional Compatibility for Anomaly Detection", arXiv 2601.22868): the method's glue; its
layers and losses are in ``model.py``. For context anomalies: a subject that is normal in
itself, in a place where it does not belong. The authors' code is not released; where the
paper is silent this follows AA-CLIP (the choices, each deviation with its reason, the
generated context set and the measurements: ``README.md`` beside this file).

- CSR: three context-selective residual branches, subject, context and global, each a set of
  residual adapters on every tapped level (AA-CLIP's form), then projections into the joint
  space; a branch's embedding ``z_b`` pools its last level's patch embeddings with a learned
  query (zero at first: a mean pooling).
- Text refinement: gated residual adapters ``x + tanh(g) A(x)`` after the first ``text_layers``
  text blocks give per class ``t0`` (normal) and ``t1`` (anomalous), the normalised means of
  the prompt pack's sentences (``components.anchors.ensemble_anchor``). Trained with
  orthogonality ``(t0 . t1)^2``, consistency ``1 - cos(t0 + t1, e)`` (e: the frozen encoder's
  prototype of the class) and grounding ``1 - cos(t0 + t1, v)`` (v: the frozen image embedding
  of each image).
- CRM: ``alpha = softmax_b(q . k_b / sqrt(d))``, ``q = W_q t1``, ``k_b = W_k z_b``; fused
  ``z = sum_b alpha_b z_b`` and, with the same alpha, fused patch embeddings per level.
  Regularisers: the entropy of alpha and the consistency of alpha between the training views
  and the whole frame. ``fusion: mean`` averages instead.
- Scores: image ``s = sigmoid(cos(z, t1) - cos(z, t0))``; map: per level and patch
  ``softmax(100 [cos(p, t0), cos(p, t1)])[1]`` of the fused patch embeddings, averaged over
  levels, upsampled and smoothed (``sigma``).
- Two stages: ``text`` (the refinement losses), then ``image`` (CSR and CRM) against the frozen
  t0, t1: BCE of ``s`` on the whole frame and on the views, focal + dice on the map, the
  ``view`` loss (each of the subject and context branches' whole-frame embeddings pulled to
  its detached view embedding), the alpha regularisers; weights ``LOSS_WEIGHTS`` unless
  ``loss_weights`` says otherwise. In training the subject branch sees the subject alone and
  the context branch the scene without it (``training_views``, made from subject masks,
  ``scoring.training.masked_view``); the global branch sees the frame. At test time every
  branch sees the whole frame and no mask is needed.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ...components.anchors import ensemble_anchor
from ...losses import segmentation_loss
from ...options import OPTIONS
from ...prompts import mean_anchor
from ...training import VIEWS, state_digest
from ..base import STATES, AnomalyMethod, AnomalyScores, gaussian_blur, register_method, seeded_init, upsample
from .model import (
    BRANCHES,
    ContextBranches,
    GatedResidualAdapter,
    TextConditionedFusion,
    alpha_consistency,
    alpha_entropy,
    compatibility,
    compatibility_loss,
    consistency_loss,
    fuse,
    grounding_loss,
    orthogonality_loss,
    patch_probability,
)

FUSIONS = ("crm", "mean")
LOSS_WEIGHTS = {"orthogonal": 0.1, "consistency": 1.0, "grounding": 0.1, "entropy": 0.1, "alpha_consistency": 1.0,
                "view": 1.0}


@register_method
class CoReCLIP(AnomalyMethod):
    """Subject / context / global residual branches fused by text-conditioned attention."""

    name = "core-clip"
    Options = OPTIONS["core-clip"]
    stages = ("text", "image")
    stage_lr = {"text": 1e-5, "image": 5e-4}  # AA-CLIP's (the summary gives none)

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        o = self.options
        adapt_weight, fusion = o.adapt_weight, o.fusion
        self.sigma, self.prompt_sample, self.fusion = o.sigma, o.prompt_sample, fusion
        self.branches = tuple(b for b in BRANCHES if b in o.branches)  # one order whatever the option's
        self.weights = {**LOSS_WEIGHTS, **(o.loss_weights or {})}
        text_layers = min(o.text_layers, len(backbone.clip.transformer.resblocks))  # shallow test towers
        with seeded_init():
            self.text = nn.ModuleList(GatedResidualAdapter(backbone.clip.transformer.width, adapt_weight)
                                      for _ in range(text_layers))
            self.csr = ContextBranches(self.branches, len(backbone.layers), backbone.width, backbone.embed_dim,
                                       adapt_weight)
            self.crm = TextConditionedFusion(backbone.embed_dim) if fusion == "crm" else None
        self.to(backbone.device).requires_grad_(False)
        self._stage_anchors: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, torch.Tensor] = {}

    @property
    def training_views(self) -> tuple[str, ...]:
        return tuple(view for view in VIEWS if view in self.branches)

    # ---- text side --------------------------------------------------------------------
    def text_identity(self) -> str:
        return "core-clip-text:" + state_digest(dict(self.text.state_dict()))

    def _encode_sentences(self, sentences: list[str]) -> torch.Tensor:
        """Refined text embeddings [N, D], L2-normalised (differentiable in the adapters)."""
        def after_block(index, x):
            return self.text[index](x) if index < len(self.text) else x

        return F.normalize(self.backbone.encode_tokens(self.backbone.tokenize(sentences), after_block=after_block), dim=-1)

    def encode_prompts(self, class_name: str, state: str, sample: random.Random | None = None) -> torch.Tensor:
        """t0 or t1 [D]: the normalised mean of the state's refined sentence embeddings; with
        ``sample`` (the text stage) up to ``prompt_sample`` sentences drawn, with a graph."""
        sentences = self.prompt_pack.prompts(class_name)[STATES.index(state)]
        return ensemble_anchor(self._encode_sentences, sentences, sample, self.prompt_sample)

    def class_anchors(self, class_name: str, sample: random.Random | None = None) -> torch.Tensor:
        """[2, D]: t0, t1 of the class, drawing from ``sample``."""
        return torch.stack([self.encode_prompts(class_name, state, sample) for state in STATES])

    # ---- image side -------------------------------------------------------------------
    def _branch_outputs(self, per_branch: dict, patches: bool = True):
        """Every branch on its features: z [B, branches, D] and per level [B, branches, N, D] (or None)."""
        ln_post = self.backbone.clip.visual.ln_post
        outputs = [self.csr(b, per_branch[b].patch_tokens, ln_post, patches) for b in self.branches]
        z = torch.stack([o[0] for o in outputs], dim=1)
        if not patches:
            return z, None
        return z, [torch.stack(level, dim=1) for level in zip(*(o[1] for o in outputs))]

    def _fusion_weights(self, t1: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """alpha [B, branches]: CRM's attention, or plain averaging."""
        if self.crm is None:
            return torch.full(z.shape[:2], 1.0 / z.shape[1], device=z.device, dtype=z.dtype)
        return self.crm(t1, z)

    def image_outputs(self, features, anchors: torch.Tensor, patches: bool = True):
        """(alpha [B, branches], score s [B], per-level fused patch probabilities [B, N] or None
        without ``patches``, z [B, branches, D]); ``features``: one ``VisualFeatures`` every
        branch sees, or a dict of them by branch (the training views); anchors [B, 2, D]."""
        per_branch = features if isinstance(features, dict) else {b: features for b in self.branches}
        z, levels = self._branch_outputs(per_branch, patches)
        alpha = self._fusion_weights(anchors[:, 1], z)
        score = compatibility(fuse(alpha, z), anchors)
        maps = None if levels is None else [patch_probability(fuse(alpha, level), anchors) for level in levels]
        return alpha, score, maps, z

    def score_features(self, features, size) -> AnomalyScores:
        anchors = self.anchors.stacked().expand(features.image_embed.shape[0], -1, -1)
        _, image_score, maps, _ = self.image_outputs(features, anchors)
        anomaly_map = upsample(torch.stack(maps).mean(0).view(-1, *features.grid), size)
        if self.memory is not None:
            anomaly_map, image_score = self.blend(anomaly_map, image_score, self.memory_map(features, size))
        return AnomalyScores(image_score, gaussian_blur(anomaly_map, self.sigma))

    # ---- training ---------------------------------------------------------------------
    def begin_stage(self, stage, class_names):
        self._sample = random.Random(0)
        with torch.no_grad():
            if stage == "text":  # the frozen encoder's prototype of each class (consistency)
                self._frozen = {c: F.normalize(sum(mean_anchor(self.backbone.encode_text(s))
                                                   for s in self.prompt_pack.prompts(c)), dim=-1) for c in class_names}
            else:  # t0, t1 are frozen from here on
                self._stage_anchors = {c: self.class_anchors(c) for c in class_names}

    def stage_parameters(self, stage):
        if stage == "text":
            return list(self.text.parameters())
        return [*self.csr.parameters(), *(self.crm.parameters() if self.crm is not None else ())]

    def stage_loss(self, stage, batch):
        return self._text_loss(batch) if stage == "text" else self._image_loss(batch)

    def _text_loss(self, batch):
        classes = sorted(set(batch.class_names))
        anchors = torch.stack([self.class_anchors(c, self._sample) for c in classes])  # [C, 2, D]
        t0, t1 = anchors[:, 0], anchors[:, 1]
        orthogonal = orthogonality_loss(t0, t1)
        consistency = consistency_loss(t0, t1, torch.stack([self._frozen[c] for c in classes]))
        prototypes = (t0 + t1)[[classes.index(c) for c in batch.class_names]]
        grounding = grounding_loss(prototypes, batch.features.image_embed)
        w = self.weights
        loss = w["orthogonal"] * orthogonal + w["consistency"] * consistency + w["grounding"] * grounding
        return {"loss": loss, "orthogonal": orthogonal, "consistency": consistency, "grounding": grounding}

    def _image_loss(self, batch):
        anchors = torch.stack([self._stage_anchors[c] for c in batch.class_names])  # [B, 2, D]
        viewed = {b: batch.views.get(b, batch.features) for b in self.branches}
        alpha, score, maps, z = self.image_outputs(batch.features, anchors)
        alpha_v, score_v, _, z_v = self.image_outputs(viewed, anchors, patches=False)
        probability = upsample(torch.stack(maps).mean(0).view(-1, *batch.features.grid), batch.size)
        compat = compatibility_loss(score, batch.labels) + compatibility_loss(score_v, batch.labels)
        seg = segmentation_loss(probability, batch.masks)
        viewed_branches = [i for i, b in enumerate(self.branches) if b in VIEWS]
        view = sum((1 - (z[:, i] * z_v[:, i].detach()).sum(-1)).mean() for i in viewed_branches) if viewed_branches \
            else z.new_zeros(())
        entropy, agreement = alpha_entropy(alpha_v), alpha_consistency(alpha, alpha_v)
        w = self.weights
        loss = compat + seg + w["view"] * view + w["entropy"] * entropy + w["alpha_consistency"] * agreement
        return {"loss": loss, "compatibility": compat, "seg": seg, "view": view, "entropy": entropy,
                "alpha_consistency": agreement}

    def end_training(self):
        super().end_training()
        self._stage_anchors, self._frozen = {}, {}
