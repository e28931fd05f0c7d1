"""AA-CLIP (Ma et al., "AA-CLIP: Enhancing Zero-shot Anomaly Detection via Anomaly-Aware
CLIP", CVPR 2025).

The paper text we have (../shared/papers/aa-clip.md) is a summary; the form below follows
the authors' code, github Mwxinnn/AA-CLIP. Only its ``test.py`` is in our code index; the rest
was read in a copy of the repository, zhuguli-diu/AA-CLIP (``train.py``, ``model/adapter.py``,
``model/adapter_modules.py``, ``forward_utils.py``, ``dataset/__init__.py``,
``model/transformer.py``).

Stage 1 makes the text anchors anomaly-aware: residual adapters after the first three
blocks of the frozen text encoder (``x <- 0.9 x + 0.1 A(x)``, ``A`` = bias-free linear +
LeakyReLU, its output rescaled to the token's norm; ``SimpleAdapter``) and a trained text
projection that replaces CLIP's (bias-free linear + LeakyReLU: ``SimpleProj(relu=True)``).
They are trained against frozen visual features: per tapped level the V-V ("surgery") patch
embeddings, L2-normalised, plus the L2-normalised class embedding (not normalised again:
``train_text_adapter``); focal + dice on the patch-text maps (CLIP temperature 100) plus the
disentangle loss ``0.1 * <T_N, T_A>^2``. The V-V path is the backbone's
(``--vv-attention``, on in both presets).

Stage 2 freezes those anchors and aligns patch features to them: residual adapters on the
multi-level patch tokens (same form, weight 0.1), then a bias-free linear projection per
level into the text space (focal + dice per level, temperature 100) and a detection
projection of the last level, mean-pooled: its cross-entropy against the labels takes the
raw cosines as logits, as ``train_image_adapter`` does. The backbone stays frozen. Rates are
the authors' (1e-5 for stage 1, 5e-4 for stage 2); the ``paper`` preset adds their schedule
(5 + 20 epochs, batch 16 / 2, Adam betas (0.5, 0.999), the rate halved after 16k and 32k
image steps), ViT-L-14-336 at 518 px and layers 6, 12, 18, 24.

Scores: anomaly map = mean over levels of the softmax probability of "abnormal" per patch
(smoothed, ``sigma``); image score = 0.5 * (cos(det, T_A) + 1) / 2 + 0.5 * max of the map:
the detection token ranks by its cosine to the abnormal anchor alone (``test.py``).

Deviations (each with its reason):
- The authors' image adapters sit inside the first six ViT blocks and change the residual
  stream the later blocks see; here they act on each tapped level's tokens, so the frozen ViT
  runs once per image and its features are cached (what makes training on a CPU practical).
- Their V-V path replaces the attention of the last 19 blocks of a second ViT (MLPs kept);
  linewatch's is CLIP Surgery's dual path (V-V attention summed from the first tapped block,
  no MLP), computed alongside the plain one in the same pass.
- Their test map is linear in ``cos_A - cos_N`` (blurred at sigma 1 patch on the grid), and
  map and detection score are min-max normalised over the whole test set before they are
  mixed. A live frame cannot wait for the test set: here every score is in [0, 1] by itself
  (probability map, ``(cos + 1) / 2``), and ``sigma`` (pixels) is 14 in the paper preset,
  one ViT-L/14 patch.
- Their stage-1 loop reassigns the loss at each level, so only the last tapped level trains
  the text side; here every level's loss is summed.
- They augment online (a new random view of each image every epoch); linewatch caches the
  features of ``views`` fixed views, so the paper preset trains on the images as they are
  (1 view) and keeps the authors' epoch and step counts.
- Each training step of the cpu preset encodes a random subset of the prompt ensemble (up to
  ``prompt_sample`` sentences per state; null: all of it, as the authors and the paper
  preset); the anchors at inference use all of it.
- Protocol: the authors train on an auxiliary dataset (VisA) and test zero-shot on others;
  ``linewatch train --eval OTHER`` does that. Same-dataset k + k sampling is linewatch's.
- ``memory_bank`` (true in the cpu preset) adds APRIL-GAN's normal reference memory when
  references are given; the paper uses none (the paper preset sets it false).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import segmentation_loss
from ..prompts import TextAnchors
from ..training import state_digest
from ..options import OPTIONS
from .base import (
    CLIP_TEMPERATURE,
    AnomalyMethod,
    AnomalyScores,
    register_method,
    seeded_init,
    upsample,
)


class ResidualAdapter(nn.Module):
    """AA-CLIP's residual adapter: ``(1 - w) x + w * A(x) * |x| / |A(x)|``, A = LeakyReLU(W x)."""

    def __init__(self, width: int, weight: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        nn.init.xavier_uniform_(self.linear.weight)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.linear(x))
        out = out * x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return (1 - self.weight) * x + self.weight * out


def xavier_linear(fan_in: int, fan_out: int, leaky_relu: bool = False) -> nn.Module:
    """The authors' ``SimpleProj``: bias-free linear (xavier init), LeakyReLU after it when asked."""
    linear = nn.Linear(fan_in, fan_out, bias=False)
    nn.init.xavier_uniform_(linear.weight)
    return nn.Sequential(linear, nn.LeakyReLU()) if leaky_relu else linear


def ensemble_anchors(encode, states: tuple[list[str], list[str]], sample: random.Random | None,
                     limit: int | None) -> torch.Tensor:
    """[2, D]: per state the normalised mean of ``encode(sentences)``. With ``sample`` (training)
    up to ``limit`` sentences per state are drawn and the graph is kept; without, every
    sentence is encoded in chunks, without a graph."""
    anchors = []
    for sentences in states:
        if sample is not None and limit and len(sentences) > limit:
            sentences = sample.sample(sentences, limit)
        if sample is None:
            with torch.no_grad():
                embeds = torch.cat([encode(sentences[i:i + 256]) for i in range(0, len(sentences), 256)])
        else:
            embeds = encode(sentences)
        anchors.append(F.normalize(embeds.mean(0), dim=-1))
    return torch.stack(anchors)


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

    def encode_sentences(self, sentences: list[str]) -> torch.Tensor:
        """Adapted text embeddings [N, D], L2-normalised (differentiable)."""
        adapters = self.text["adapters"]

        def after_block(index, x):
            return adapters[index](x) if index < len(adapters) else x

        embeds = self.backbone.encode_tokens(self.backbone.tokenize(sentences), after_block=after_block,
                                             projection=self.text["projection"])
        return F.normalize(embeds, dim=-1)

    def class_anchors(self, class_name: str, sample: random.Random | None = None) -> torch.Tensor:
        """[2, D] (normal, abnormal), each the normalised mean of its sentences' embeddings."""
        return ensemble_anchors(self.encode_sentences, self.prompt_pack.prompts(class_name), sample, self.prompt_sample)

    def build_anchors(self, class_name: str) -> TextAnchors:
        normal, abnormal = self.class_anchors(class_name)
        return TextAnchors(normal, abnormal, self.anchor_key(class_name))

    # ---- image side -------------------------------------------------------------------
    def adapted_levels(self, features) -> list[torch.Tensor]:
        ln_post = self.backbone.clip.visual.ln_post
        return [ln_post(adapter(tokens)) for adapter, tokens in zip(self.image["adapters"], features.patch_tokens)]

    def image_outputs(self, features, anchors: torch.Tensor):
        """Per-level patch logits [B, N, 2] (temperature 100) and the detection embedding [B, D]
        (normalised, mean-pooled over the last level's patches); ``anchors`` [2, D] or [B, 2, D]."""
        anchors_t = anchors.transpose(-1, -2)
        levels = self.adapted_levels(features)
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
