"""MadCLIP (Shiri et al., "MadCLIP: Few-shot Medical Anomaly Detection with CLIP", MICCAI 2025).

Where the paper is silent the form follows the authors' code, github mahshid1998/MadCLIP
(``train.py``, ``loss.py``, ``Prompt/CoOp.py``, ``Prompt/promptChooser.py``); its adapters,
``CLIP/adapter_shared.py``, are not in our code index and were read in a copy of the
repository, shoiabshafi/MyMedCLIP.

Dual branch: at each tapped level i, a normal adapter A_n^i and an abnormal adapter A_ab^i,
each a shared layer ``ReLU(W_shared x)`` followed by two heads, detection ``ReLU(W_det .)`` and
segmentation ``ReLU(W_seg .)`` (bias-free, as the paper's formulas), mapping the level's
patch features into the text space. The adapters read the tapped tokens and leave the ViT's
residual stream alone, as the authors' code does, so the frozen ViT runs once per image.

Prompts (CoOp with class-specific context, ``CSC=True``): every state phrase of the pack with
the object's name ("flawless {}", "{} with flaw", ...; no templates) is one prompt per
placement of the learnable words: ``[V1..VM] phrase.``, ``phrase [V1..VM].`` and
``[V1..VM/2] phrase [VM/2+1..VM].`` (CoOp's "end", "front", "middle"), each synonym and
placement with its own M context vectors. t_n and t_ab are the normalised means of their
prompts' embeddings (``PromptMaker.forward``).

Per level and head, ``S_n = O_n.t_n - O_n.t_ab`` and ``S_ab = O_ab.t_ab - O_ab.t_n``
(cosines, no temperature: ``dual_contrast``). Map ``M^i = SoftMax(Interpolate(S^i))[ab]`` from
the segmentation heads; image score ``c^i = mean over patches of SoftMax(S^i)[ab]`` from the
detection heads; both averaged over levels. Loss per level: dice + focal on M^i, plus the
SigLIP term on the detection scores as ``loss.py``'s ``LossSigmoid``: a log-sigmoid per patch
on [S_n, S_ab] signed by the image's label, averaged over patches, with no learnable
temperature or bias; summed over levels. Adam at 1e-3 as the paper; the ``paper`` preset adds
betas (0.5, 0.999), 60 epochs, batch 16, 16 shots, 11 views and ViT-L-14-336 at 238 px.

Deviations (each with its reason):
- Adapter input: the tapped tokens after CLIP's ``ln_post``. The authors' code feeds the raw
  residual stream to a LeakyReLU layer followed by a per-token normalisation (InstanceNorm)
  and LeakyReLU heads; the paper writes ReLU, which we follow, and ``ln_post`` plays the
  normalisation's part.
- Synonyms: the pack's shared state phrases each own their context; a class's extra phrases
  (``classes.<name>.normal/abnormal`` in the pack) share one more context per state, since
  they differ per class and a checkpoint must carry the same tensors for every class. Every
  name of the class (the pack's ``names``) gets the same prompts.
- Image score: the paper's c^i (detection heads). The authors' evaluation ranks images by the
  maximum of the segmentation map where masks exist.
- Image size: the paper's 240 px is not a multiple of ViT-L/14's patch (their stride-14
  convolution drops the last 2 pixel rows and columns); the paper preset uses 238 px, the
  same 17 x 17 grid.
- Views: linewatch's augmentation (random flips, quarter turns, brightness/contrast) in as
  many views as MVFA's fixed set that the paper follows (the image, 4 small rotations, 4
  translations, 2 flips: MediaBrain-SJTU/MVFA-AD ``utils.py augment``).
- Protocol: linewatch's same-dataset k + k sampling matches the paper's few-shot setting
  (k normal + k abnormal training images, tested on the rest); ``--eval OTHER`` is its
  cross-dataset evaluation.
- ``memory_bank`` (true in the cpu preset) adds APRIL-GAN's normal reference memory when
  references are given; the paper counts "no memory bank" as a contribution (the paper
  preset sets it false). ``sigma`` smooths the map (4 px in the cpu preset); the authors'
  code does not (0 in the paper preset).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import dice_loss, focal_loss, siglip_loss
from ..prompts import TextAnchors
from ..training import state_digest
from ..options import OPTIONS
from .base import (
    AnomalyMethod,
    AnomalyScores,
    register_method,
    seeded_init,
)

PLACEHOLDER = "X"
PLACEMENTS = ("end", "front", "middle")  # CoOp's names: the phrase after, before, inside the context


class BranchAdapter(nn.Module):
    """Shared layer then detection and segmentation heads, all ReLU(W x), bias-free."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.shared = nn.Linear(width, dim, bias=False)
        self.det, self.seg = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shared = F.relu(self.shared(x))
        return F.normalize(F.relu(self.det(shared)), dim=-1), F.normalize(F.relu(self.seg(shared)), dim=-1)


def dual_scores(o_n: torch.Tensor, o_ab: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[S_n, S_ab] [..., N, 2] from the branches' normalised features [..., N, D] and the
    anchors (t_n, t_ab) [2, D] or [B, 2, D]: S_n = O_n.t_n - O_n.t_ab, S_ab = O_ab.t_ab - O_ab.t_n."""
    t = anchors.transpose(-1, -2)  # [..., D, 2]
    s_n = (o_n @ t) @ torch.tensor([1.0, -1.0], device=t.device)
    s_ab = (o_ab @ t) @ torch.tensor([-1.0, 1.0], device=t.device)
    return torch.stack([s_n, s_ab], dim=-1)


def abnormal_map(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """M = SoftMax(Interpolate(S))[ab]: per-patch [S_n, S_ab] [B, N, 2] -> [B, H, W]."""
    logits = scores.transpose(1, 2).unflatten(-1, grid)  # [B, 2, h, w]
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)[:, 1]


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

    def phrases(self, class_name: str, state: str) -> tuple[list[str], list[int]]:
        """The state's phrases with the object's names filled in, and each one's context row."""
        entry = self.prompt_pack.classes.get(class_name)
        names = (entry.names if entry and entry.names else None) or [class_name.replace("_", " ")]
        shared = getattr(self.prompt_pack.states, state)
        extra = getattr(entry, state) if entry else []
        rows = list(range(len(shared))) + [len(shared)] * len(extra)
        pairs = [(p.format(n), row) for n in names for p, row in zip(shared + extra, rows)]
        return [p for p, _ in pairs], [row for _, row in pairs]

    def encode_state(self, class_name: str, state: str) -> torch.Tensor:
        """t_n or t_ab [D] (normalised; differentiable in the context vectors)."""
        phrases, rows = self.phrases(class_name, state)
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

    def class_anchors(self, class_name: str) -> torch.Tensor:
        """[2, D]: t_n, t_ab."""
        return torch.stack([self.encode_state(class_name, state) for state in ("normal", "abnormal")])

    def build_anchors(self, class_name: str) -> TextAnchors:
        with torch.no_grad():
            normal, abnormal = self.class_anchors(class_name)
        return TextAnchors(normal, abnormal, self.anchor_key(class_name))

    # ---- image side -------------------------------------------------------------------
    def branch_scores(self, features, anchors: torch.Tensor):
        """Per level (det, seg), each [B, N, 2] = [S_n, S_ab]; anchors [2, D] or [B, 2, D]."""
        ln_post = self.backbone.clip.visual.ln_post
        levels = []
        for normal, abnormal, tokens in zip(self.adapters["normal"], self.adapters["abnormal"], features.patch_tokens):
            x = ln_post(tokens)
            (det_n, seg_n), (det_a, seg_a) = normal(x), abnormal(x)
            levels.append((dual_scores(det_n, det_a, anchors), dual_scores(seg_n, seg_a, anchors)))
        return levels

    def score_features(self, features, size) -> AnomalyScores:
        levels = self.branch_scores(features, self.anchors.stacked())
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
        for det, seg in self.branch_scores(batch.features, anchors):
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
