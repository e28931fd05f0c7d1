"""MadCLIP (Shiri et al., "MadCLIP: Few-shot Medical Anomaly Detection with CLIP", MICCAI
2025): the method's glue; its layers and scores are in ``model.py``. Where the paper is silent
the form is the authors' code (github mahshid1998/MadCLIP); what was read where, every
deviation with its reason, and the measurements are in ``README.md`` beside this file.

Dual branch (§2, "Vision Adapters", "Dual Branch Architecture"): at each tapped level a normal
and an abnormal ``BranchAdapter`` read the level's tokens after CLIP's ``ln_post`` (the ViT's
residual stream is left alone, so the frozen ViT runs once per image), each a shared layer
``ReLU(W_shared x)`` and two bias-free heads, detection and segmentation.

Prompts (§2, "Learnable Prompts"; CoOp with class-specific context): every state phrase of the
pack with the object's name is one prompt per placement of the learnable words, ``[V1..VM]
phrase.``, ``phrase [V1..VM].`` and ``[V1..VM/2] phrase [VM/2+1..VM].`` (CoOp's "end", "front",
"middle"); each shared phrase and placement has its own M context vectors, a class's own
phrases share one more. t_n and t_ab are the normalised means of their prompts' embeddings.

Scores: per level and head ``dual_scores`` (raw cosine differences, no temperature); map =
``SoftMax(Interpolate(S))[ab]`` of the segmentation heads, image score = mean over patches
of ``SoftMax(S)[ab]`` of the detection heads, both averaged over levels, smoothed by
``sigma``. Loss per level (§2, "Loss Function"): dice + focal on the map plus the per-patch
SigLIP term on the detection scores (``losses.siglip_loss``), summed over levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import dice_loss, focal_loss, siglip_loss
from ...options import OPTIONS
from ...training import state_digest
from ..base import (
    AnomalyMethod,
    AnomalyScores,
    register_method,
    seeded_init,
)
from .model import BranchAdapter, abnormal_map, dual_scores

PLACEHOLDER = "X"
PLACEMENTS = ("end", "front", "middle")  # CoOp's names: the phrase after, before, inside the context


@register_method
class MadCLIP(AnomalyMethod):
    """Dual normal/abnormal adapters with detection and segmentation heads, learnable prompts, SigLIP."""

    name = "madclip"
    Options = OPTIONS["madclip"]
    version = 2
    version_note = ("v2 follows the authors' code: per-patch SigLIP without temperature or bias, raw-cosine "
                    "scores, a context per synonym and placement, bias-free adapters")
    stages = ("adapters",)
    stage_lr = {"adapters": 1e-3}  # the paper's Adam rate

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        self.sigma, self.context_words = self.options.sigma, self.options.context_words
        text_width, width, dim = backbone.clip.transformer.width, backbone.width, backbone.embed_dim
        states = self.prompt_pack.states
        with seeded_init():  # one context per shared synonym, one for a class's own phrases; per placement
            self.text = nn.ParameterDict({
                state: nn.Parameter(0.02 * torch.randn(len(phrases) + 1, len(PLACEMENTS), self.context_words, text_width))
                for state, phrases in (("normal", states.normal), ("abnormal", states.abnormal))})
            self.adapters = nn.ModuleDict({branch: nn.ModuleList(BranchAdapter(width, dim) for _ in backbone.layers)
                                           for branch in ("normal", "abnormal")})
        self.to(backbone.device).requires_grad_(False)

    # ---- text side --------------------------------------------------------------------
    def text_identity(self) -> str:
        return "madclip-prompts:" + state_digest({k: v for k, v in self.text.items()})

    def _phrases(self, class_name: str, state: str) -> tuple[list[str], list[int]]:
        """The state's phrases with the object's names filled in, and each one's context row."""
        entry = self.prompt_pack.classes.get(class_name)
        names = (entry.names if entry and entry.names else None) or [class_name.replace("_", " ")]
        shared = getattr(self.prompt_pack.states, state)
        extra = getattr(entry, state) if entry else []
        rows = list(range(len(shared))) + [len(shared)] * len(extra)
        pairs = [(p.format(n), row) for n in names for p, row in zip(shared + extra, rows)]
        return [p for p, _ in pairs], [row for _, row in pairs]

    def encode_prompts(self, class_name: str, state: str) -> torch.Tensor:
        """t_n or t_ab [D] (normalised; differentiable in the context vectors). ``class_anchors``
        is the base's: [2, D] = (t_n, t_ab)."""
        phrases, rows = self._phrases(class_name, state)
        m = self.context_words
        tokens = self.backbone.tokenize([f"{' '.join([PLACEHOLDER] * m)} {p}." for p in phrases])  # [S, L]
        lengths = (self.backbone.tokenize(phrases).argmax(-1) - 1).tolist()  # each phrase's own tokens
        base = self.backbone.clip.token_embedding(tokens)  # [S, L, W]
        context = self.text[state][torch.tensor(rows, device=tokens.device)]  # [S, placements, M, W]
        embeddings = []
        for k, placement in enumerate(PLACEMENTS):
            rows_ = torch.cat([base[:, :1], context[:, k].to(base.dtype), base[:, 1 + m:]], dim=1)  # "end" layout
            order = torch.stack([placement_order(placement, m, n, tokens.shape[1]) for n in lengths]).to(tokens.device)
            embeddings.append(rows_.gather(1, order[..., None].expand(-1, -1, rows_.shape[-1])))
        # Every placement keeps the end token where it was, so the same token ids find it.
        out = self.backbone.encode_tokens(tokens.repeat(len(PLACEMENTS), 1), embeddings=torch.cat(embeddings))
        return F.normalize(out.mean(0), dim=-1)

    # ---- image side -------------------------------------------------------------------
    def image_outputs(self, features, anchors: torch.Tensor):
        """Per level (det, seg), each [B, N, 2] = [S_n, S_ab]; anchors [2, D] or [B, 2, D]."""
        ln_post = self.backbone.clip.visual.ln_post
        levels = []
        for normal, abnormal, tokens in zip(self.adapters["normal"], self.adapters["abnormal"], features.patch_tokens):
            x = ln_post(tokens)
            (det_n, seg_n), (det_a, seg_a) = normal(x), abnormal(x)
            levels.append((dual_scores(det_n, det_a, anchors), dual_scores(seg_n, seg_a, anchors)))
        return levels

    def score_features(self, features, size) -> AnomalyScores:
        levels = self.image_outputs(features, self.anchors.stacked())
        anomaly_map = torch.stack([abnormal_map(seg, features.grid, size) for _, seg in levels]).mean(0)
        image_score = torch.stack([det.softmax(-1)[..., 1].mean(1) for det, _ in levels]).mean(0)
        return self.finish_scores(anomaly_map, image_score, features, size)

    # ---- training ---------------------------------------------------------------------
    def stage_parameters(self, stage):
        return [*self.text.values(), *self.adapters.parameters()]

    def stage_loss(self, stage, batch):
        per_class = {c: self.class_anchors(c) for c in sorted(set(batch.class_names))}
        anchors = torch.stack([per_class[c] for c in batch.class_names])  # [B, 2, D]
        dice = focal = siglip = 0.0
        for det, seg in self.image_outputs(batch.features, anchors):
            probability = abnormal_map(seg, batch.features.grid, batch.size)
            dice = dice + dice_loss(probability, batch.masks)
            focal = focal + focal_loss(probability, batch.masks)
            siglip = siglip + siglip_loss(det, batch.labels)
        return {"loss": dice + focal + siglip, "dice": dice, "focal": focal, "siglip": siglip}


def placement_order(placement: str, m: int, n: int, length: int) -> torch.Tensor:
    """Positions of a prompt laid out as ``[start][context x m][phrase x n][rest]`` in the order
    of ``placement``: the context after, before or around (m/2 each side) the phrase."""
    start, context, phrase = [0], list(range(1, 1 + m)), list(range(1 + m, 1 + m + n))
    rest = list(range(1 + m + n, length))
    if placement == "end":
        order = start + context + phrase + rest
    elif placement == "front":
        order = start + phrase + context + rest
    else:
        order = start + context[:m // 2] + phrase + context[m // 2:] + rest
    return torch.tensor(order)
