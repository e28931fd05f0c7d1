"""KAnoCLIP (Li et al., "KAnoCLIP: Zero-Shot Anomaly Detection through Knowledge-Driven Prompt
Learning and Enhanced Cross-Modal Integration", ICASSP 2025).

No code of the authors is published: a search of code, GitHub issues, documentation and web
pages for KAnoCLIP, its modules (KnPL, Bi-CMCI) and its authors found none. Where the paper
is silent the form follows the released code of AnomalyCLIP (github zqhang/AnomalyCLIP,
``train.py``, ``test.py``, ``prompt_ensemble.py``), the method KAnoCLIP builds on and compares
with: its eq. 10 is AnomalyCLIP's test map ``(p_a + 1 - p_n) / 2`` and its eq. 15 AnomalyCLIP's
training loss line for line, and K = 12 is AnomalyCLIP's ``n_ctx``.

Components (paper §2):
- **CLIP-VV** (§2.3): the backbone's V-V attention path gives the local patch features
  (``patch_embeds``: ``ln_post`` + ``proj`` of the V-V tokens); the method refuses a backbone
  without it (``needs_vv_attention``). The global feature ``I_G`` is the original path's
  class embedding, as CLIP Surgery's dual path keeps it.
- **KnPL** (§2.2): learnable contexts ``[N1..NK][normal|perfect][class].`` and
  ``[A1..AK][abnormal|defective][class].``, one normal and one abnormal context (K word
  vectors each, N(0, 0.02) as AnomalyCLIP) shared by every class, adjective and name of the
  class (the prompt pack's ``names``). The frozen text tower runs with gradients that reach
  only the contexts; ``F_n``, ``F_a`` are the normalised means of their prompts' unit
  embeddings. **L_KD** (eq. 2-3) pulls them by ``max(0, d(k, a) - d(k, n))`` towards the
  knowledge ``k``: per training image the mean unit embedding of its class's descriptions
  and, for an anomalous image, its own description (N + M with M = 1 as the paper).
- **Bi-CMCI** (§2.4, eq. 9-10): per tapped level, ``scoring.cross_modal.BiCrossAttention`` on
  that level's patch features and ``(F_n, F_a)``: self-attention in each modality, text ->
  visual and visual -> text cross-attention, and plain (not deformable) attention on the
  visual tokens (the reason is in ``scoring/cross_modal.py``). Each level's map is the
  softmax over (normal, abnormal) of CLIP-temperature (100) cosines between refined patch
  and refined text tokens.
- **Conv-Adapter** (eq. 11) on ``I_G``: ``ReLU(LN(I_G) W_down) W_up``, bottleneck D / 4.
- **Scores**: ``S_global = softmax(100 cos(Î_G, F_text))[abnormal] + max(M)`` (eq. 12),
  halved into [0, 1] (``image_score``; the same ranking). **Losses** (eq. 13-15, weights 1):
  ``alpha L_KD + BCE(S_global / 2, label) + Focal(M^a, G) + Dice(M^a, G) + Dice(M^n, 1 - G)``.

Knowledge without a language model (the paper's GPT-3.5 and Llama3 are not available here):
the class descriptions come from a knowledge pack (``scoring/knowledge.py``; the bundled
``prompt_packs/knowledge.yaml`` was written by people for the purpose and says so), and each
anomalous training image's description is generated from its mask and pixels (where, how
large, what shape, what colour: ``describe_anomaly``), in the form of the paper's VQA
example. ``--option knowledge=FILE.yaml`` takes a user's pack; the checkpoint carries the
pack with its digest (``options.knowledge``), and the digest is part of the anchor key.

Choices where the paper is silent, each written down:
- Bi-CMCI depth, heads, widths (its Fig. 3): one block per tapped level (each level its own
  weights), tokens in the joint width D (512 for ViT-B-16, 768 for ViT-L-14-336), attention in
  a D / 4 bottleneck with 4 heads, no MLP, zero-initialised output projections (an untrained
  block is the identity, so training starts from CLIP's own patch-text alignment).
- Eq. 9's Norm is the mean over levels: each level's pair sums to 1 per patch, so the mean is
  in [0, 1]; a per-image min-max would put max(M) at 1 on every image, and eq. 12 could not use it.
- Eq. 10 with softmax pairs: ``M^n = 1 - M^a`` at every pixel (also after the mean), so
  ``G_sigma(M^a + 1 - M^n) / 2 = G_sigma(M^a)``: the map is computed as ``G_sigma(M^a)``, the
  identity stated rather than evaluated. Eq. 15's terms stay as written (``Dice(M^n, 1 - G)``
  is ``linewatch.scoring.losses.segmentation_loss``'s third term).
- sigma = 4 px (AnomalyCLIP's ``test.py`` default, at 518 px; linewatch's default at 224 px).
- Temperature 100 (CLIP's) on every cosine; eq. 12 writes a bare dot product.
- The maps are upsampled bilinearly (probabilities, as AnomalyCLIP) before the losses.

Deviations:
- Knowledge from a human-written pack and mask-derived sentences instead of an LLM and a VQA
  model (above); a class missing from the pack uses the pack's ``default`` descriptions.
- Bi-CMCI's visual refinement is plain attention, not deformable (reason above).
- The paper's protocol trains on an auxiliary dataset (MVTec-AD's test set) and tests
  zero-shot on others: ``linewatch train --data AUX --eval OTHER``. linewatch's k + k
  sampling of one dataset is a few-shot setting the paper does not report.
- ``memory_bank`` (true in the cpu preset) adds APRIL-GAN's normal reference memory when
  references are given; the paper uses none (false in the paper preset).
- Ablation switches (paper Table 3): ``clip_vv`` (false: local features from the original
  path), ``bicmci`` (false: patch-text maps without Bi-CMCI), ``conv_adapter`` (false:
  ``Î_G = I_G``), ``knowledge_weight`` (alpha; 0: without L_KD). Every one is on in both presets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cross_modal import BiCrossAttention, ConvAdapter
from ..knowledge import KnowledgePack, describe_anomaly
from ..losses import knowledge_loss, segmentation_loss
from ..prompts import TextAnchors, anchor_key
from ..training import state_digest
from ..options import OPTIONS
from .base import (
    CLIP_TEMPERATURE,
    AnomalyMethod,
    AnomalyScores,
    gaussian_blur,
    register_method,
    seeded_init,
    upsample,
)

STATE_WORDS = {"normal": ("normal", "perfect"), "abnormal": ("abnormal", "defective")}  # paper eq. 1
PLACEHOLDER = "X"  # one token per context word, replaced by the learned vectors


@register_method
class KAnoCLIP(AnomalyMethod):
    """Knowledge-driven learnable prompts, CLIP-VV local features, Bi-CMCI maps, Conv-Adapter score."""

    name = "kanoclip"
    Options = OPTIONS["kanoclip"]
    needs_vv_attention = True
    stages = ("joint",)  # §2.5: one joint optimisation of everything trained
    stage_lr = {"joint": 1e-3}  # the paper is silent; AnomalyCLIP's train.py --learning_rate

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        o = self.options
        context_words, bicmci, conv_adapter = o.context_words, o.bicmci, o.conv_adapter
        self.sigma, self.context_words, self.knowledge_weight, self.clip_vv = o.sigma, context_words, o.knowledge_weight, o.clip_vv
        self.knowledge = load_knowledge(o.knowledge)
        text_width, dim = backbone.clip.transformer.width, backbone.embed_dim
        with seeded_init():
            self.contexts = nn.ParameterDict({state: nn.Parameter(0.02 * torch.randn(context_words, text_width))
                                              for state in STATE_WORDS})
            self.bicmci = nn.ModuleList(BiCrossAttention(dim) for _ in backbone.layers) if bicmci else None
            self.adapter = ConvAdapter(dim) if conv_adapter else None
        self.to(backbone.device).requires_grad_(False)
        self._class_knowledge: dict[str, torch.Tensor] = {}  # class -> unit embeddings of its descriptions [N, D]
        self._row_knowledge: torch.Tensor | None = None  # per training row: the knowledge k (eq. 3) [rows, D]
        self.image_descriptions: list[str | None] = []  # per training row, from its mask (None: normal)

    # ---- text side --------------------------------------------------------------------
    def checkpoint_options(self, options):
        return {**options, "knowledge": {"digest": self.knowledge.digest, "origin": self.knowledge.origin,
                                         "pack": self.knowledge.model_dump(mode="json")}}

    def text_identity(self) -> str:
        return f"kanoclip-contexts:{state_digest(dict(self.contexts.items()))}:knowledge:{self.knowledge.digest}"

    def class_names(self, class_name: str) -> list[str]:
        entry = self.prompt_pack.classes.get(class_name)
        return (entry.names if entry and entry.names else None) or [class_name.replace("_", " ")]

    def prompt_texts(self, class_name: str, state: str) -> list[str]:
        """``[X1..XK] word name.`` for each adjective and name; the X positions take the context."""
        context = " ".join([PLACEHOLDER] * self.context_words)
        return [f"{context} {word} {name}." for name in self.class_names(class_name) for word in STATE_WORDS[state]]

    def anchor_key(self, class_name: str) -> str:
        return anchor_key(self.backbone.identity, self.prompt_texts(class_name, "normal"),
                          self.prompt_texts(class_name, "abnormal"), self.text_identity())

    def encode_state(self, class_name: str, state: str) -> torch.Tensor:
        """F_n or F_a [D]: normalised mean of the state's prompts' unit embeddings (differentiable
        in the context vectors only)."""
        tokens = self.backbone.tokenize(self.prompt_texts(class_name, state))
        base = self.backbone.clip.token_embedding(tokens)
        context = self.contexts[state].to(base.dtype).expand(len(tokens), -1, -1)
        embeddings = torch.cat([base[:, :1], context, base[:, 1 + self.context_words:]], dim=1)
        out = F.normalize(self.backbone.encode_tokens(tokens, embeddings=embeddings), dim=-1)
        return F.normalize(out.mean(0), dim=-1)

    def class_text(self, class_name: str) -> torch.Tensor:
        """F_text = [F_n, F_a], [2, D]."""
        return torch.stack([self.encode_state(class_name, state) for state in STATE_WORDS])

    def build_anchors(self, class_name: str) -> TextAnchors:
        with torch.no_grad():
            normal, abnormal = self.class_text(class_name)
        return TextAnchors(normal, abnormal, self.anchor_key(class_name))

    # ---- image side -------------------------------------------------------------------
    def local_features(self, features) -> list[torch.Tensor]:
        """Per level [B, N, D]: CLIP-VV patch embeddings, or (``clip_vv`` false) the original path's."""
        if self.clip_vv:
            return features.patch_embeds
        return [self.backbone.project(tokens) for tokens in features.patch_tokens]

    def abnormal_grid(self, features, text: torch.Tensor) -> torch.Tensor:
        """M^a on the patch grid [B, h, w] (eq. 9: the mean over levels); ``text`` [2, D] or [B, 2, D]."""
        batch = features.image_embed.shape[0]
        text = text.expand(batch, -1, -1) if text.ndim == 3 else text[None].expand(batch, -1, -1)
        levels = []
        for level, tokens in enumerate(self.local_features(features)):
            visual, words = self.bicmci[level](tokens, text) if self.bicmci is not None else (tokens, text)
            logits = CLIP_TEMPERATURE * F.normalize(visual, dim=-1) @ F.normalize(words, dim=-1).transpose(1, 2)
            levels.append(logits.softmax(-1)[..., 1])
        return torch.stack(levels).mean(0).view(batch, *features.grid)

    def global_probability(self, features, text: torch.Tensor) -> torch.Tensor:
        """softmax(100 cos(Î_G, F_text))[abnormal] [B] (eq. 12's first term)."""
        image = features.image_embed if self.adapter is None else self.adapter(features.image_embed)
        logits = CLIP_TEMPERATURE * F.normalize(image, dim=-1)[:, None] @ F.normalize(text, dim=-1).transpose(-1, -2)
        return logits.softmax(-1)[:, 0, 1]

    def text_scores(self, features, text, size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M^a at ``size``, M = G_sigma(M^a) (eq. 10), S_global / 2 (eq. 12))."""
        abnormal = upsample(self.abnormal_grid(features, text), size)
        smoothed = gaussian_blur(abnormal, self.sigma)
        return abnormal, smoothed, (self.global_probability(features, text) + smoothed.flatten(1).amax(1)) / 2

    def score_features(self, features, size) -> AnomalyScores:
        _, anomaly_map, image_score = self.text_scores(features, self.anchors.stacked(), size)
        if self.memory is not None:
            anomaly_map, image_score = self.blend(anomaly_map, image_score,
                                                  gaussian_blur(self.memory_map(features, size), self.sigma))
        return AnomalyScores(image_score, anomaly_map)

    # ---- knowledge ----------------------------------------------------------------------
    def class_knowledge(self, class_name: str) -> torch.Tensor:
        """Unit text embeddings of the class's knowledge-pack descriptions [N, D] (frozen; cached)."""
        if class_name not in self._class_knowledge:
            self._class_knowledge[class_name] = self.backbone.encode_text(
                self.knowledge.descriptions(class_name, self.class_names(class_name)[0]))
        return self._class_knowledge[class_name]

    def begin_training(self, data) -> None:
        """Describe each anomalous training image from its mask and embed, per row, eq. 3's
        knowledge: the mean of its class's descriptions and its own (the VQA description)."""
        self.image_descriptions = [describe_anomaly(image, mask, self.class_names(name)[0]) if label else None
                                   for image, mask, label, name in zip(data.images, data.masks, data.labels,
                                                                       data.class_names)]
        described = [text for text in self.image_descriptions if text is not None]
        own = iter(self.backbone.encode_text(described)) if described else iter(())
        rows = []
        for text, name in zip(self.image_descriptions, data.class_names):
            known = self.class_knowledge(name)
            rows.append(known.mean(0) if text is None else torch.cat([known, next(own)[None]]).mean(0))
        self._row_knowledge = torch.stack(rows)

    def batch_knowledge(self, batch) -> torch.Tensor:
        """k per image of the batch [B, D]; class descriptions alone without ``begin_training``."""
        if batch.index is not None and self._row_knowledge is not None:
            return self._row_knowledge[batch.index.to(self._row_knowledge.device)]
        return torch.stack([self.class_knowledge(name).mean(0) for name in batch.class_names])

    # ---- training ---------------------------------------------------------------------
    def stage_parameters(self, stage):
        modules = [m for m in (self.bicmci, self.adapter) if m is not None]
        return [*self.contexts.values(), *(p for m in modules for p in m.parameters())]

    def stage_loss(self, stage, batch):
        per_class = {name: self.class_text(name) for name in sorted(set(batch.class_names))}
        text = torch.stack([per_class[name] for name in batch.class_names])  # [B, 2, D]
        abnormal, _, score = self.text_scores(batch.features, text, batch.size)
        local = segmentation_loss(abnormal, batch.masks)  # eq. 15, with M^n = 1 - M^a
        global_ = F.binary_cross_entropy(score.clamp(1e-6, 1 - 1e-6), batch.labels.float())  # eq. 14
        knowledge = knowledge_loss(self.batch_knowledge(batch), text[:, 0], text[:, 1])  # eq. 2
        return {"loss": self.knowledge_weight * knowledge + global_ + local, "knowledge": knowledge,
                "global": global_, "local": local}

    def end_training(self):
        super().end_training()
        self._row_knowledge = None


def load_knowledge(source: str | dict | None) -> KnowledgePack:
    """The ``knowledge`` option: None (the bundled pack), a YAML file, or what a checkpoint
    carries (``{"digest", "origin", "pack"}``: the digest must match the pack)."""
    if isinstance(source, dict) and "pack" in source:
        pack = KnowledgePack.load(source["pack"])
        if source.get("digest") != pack.digest:
            raise ValueError(f"knowledge pack digest {source.get('digest')!r} does not match its content "
                             f"({pack.digest}): the checkpoint was edited or damaged")
        return pack
    if source is not None and not isinstance(source, (str, dict)):
        raise ValueError(f"knowledge must be a knowledge pack file, got {source!r}")
    return KnowledgePack.load(source)
