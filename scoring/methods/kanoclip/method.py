"""KAnoCLIP (Li et al., "KAnoCLIP: Zero-Shot Anomaly Detection through Knowledge-Driven Prompt
Learning and Enhanced Cross-Modal Integration", ICASSP 2025): the method's glue; its layers
are in ``model.py``, its knowledge in ``knowledge.py``. No code of the authors is published;
where the paper is silent the form follows AnomalyCLIP's released code. Every choice and
deviation with its reason, and the measurements: ``README.md`` beside this file.

- **CLIP-VV** (§2.3): local patch features from the backbone's V-V attention path
  (``patch_embeds``); the method refuses a backbone without it (``needs_vv_attention``). The
  global feature ``I_G`` is the original path's class embedding. ``clip_vv`` false: local
  features from the original path.
- **KnPL** (§2.2.2, eq. 1-3): learnable contexts ``[N1..NK][normal|perfect][class].`` and
  ``[A1..AK][abnormal|defective][class].``, one normal and one abnormal context (K word
  vectors each, N(0, 0.02)) shared by every class, adjective and name of the class (the
  prompt pack's ``names``). The frozen text tower runs with gradients that reach only the
  contexts; ``F_n``, ``F_a`` are the normalised means of their prompts' unit embeddings.
  **L_KD** (eq. 2-3) ``max(0, d(k, a) - d(k, n))`` towards the knowledge ``k``: per training
  image the mean unit embedding of its class's descriptions and, for an anomalous image, its
  own description (``knowledge.py``).
- **Bi-CMCI** (§2.4, eq. 9-10): per tapped level, ``model.BiCrossAttention`` on that level's
  patch features and ``(F_n, F_a)``; each level's map is the softmax over (normal, abnormal)
  of temperature-100 cosines between refined patch and refined text tokens; M^a is the mean
  over levels, the map ``G_sigma(M^a)`` (eq. 10 with softmax pairs).
- **Conv-Adapter** (eq. 11) on ``I_G``: ``model.ConvAdapter``.
- **Scores** (eq. 12): ``(softmax(100 cos(Î_G, F_text))[abnormal] + max(M)) / 2``.
  **Losses** (eq. 13-15, weights 1): ``alpha L_KD + BCE(S_global / 2, label) + Focal(M^a, G)
  + Dice(M^a, G) + Dice(M^n, 1 - G)``; one joint stage (§2.5).

``--option knowledge=FILE.yaml`` takes a user's pack; the checkpoint carries the pack with its
digest (``options.knowledge``), and the digest is part of the anchor key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import knowledge_loss, segmentation_loss
from ...options import OPTIONS
from ...prompts import anchor_key
from ...training import state_digest
from ..base import (
    CLIP_TEMPERATURE,
    AnomalyMethod,
    AnomalyScores,
    gaussian_blur,
    register_method,
    seeded_init,
    upsample,
)
from .knowledge import KnowledgePack, describe_anomaly
from .model import BiCrossAttention, ConvAdapter

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

    def _class_names(self, class_name: str) -> list[str]:
        """The class's names in prompts: the pack's ``names``, else the class with spaces."""
        entry = self.prompt_pack.classes.get(class_name)
        return (entry.names if entry and entry.names else None) or [class_name.replace("_", " ")]

    def _prompt_texts(self, class_name: str, state: str) -> list[str]:
        """``[X1..XK] word name.`` for each adjective and name; the X positions take the context."""
        context = " ".join([PLACEHOLDER] * self.context_words)
        return [f"{context} {word} {name}." for name in self._class_names(class_name) for word in STATE_WORDS[state]]

    def anchor_key(self, class_name: str) -> str:
        return anchor_key(self.backbone.identity, self._prompt_texts(class_name, "normal"),
                          self._prompt_texts(class_name, "abnormal"), self.text_identity())

    def encode_prompts(self, class_name: str, state: str) -> torch.Tensor:
        """F_n or F_a [D]: normalised mean of the state's prompts' unit embeddings (differentiable
        in the context vectors only). ``class_anchors`` is the base's: F_text = [F_n, F_a], [2, D]."""
        tokens = self.backbone.tokenize(self._prompt_texts(class_name, state))
        base = self.backbone.clip.token_embedding(tokens)
        context = self.contexts[state].to(base.dtype).expand(len(tokens), -1, -1)
        embeddings = torch.cat([base[:, :1], context, base[:, 1 + self.context_words:]], dim=1)
        out = F.normalize(self.backbone.encode_tokens(tokens, embeddings=embeddings), dim=-1)
        return F.normalize(out.mean(0), dim=-1)

    # ---- image side -------------------------------------------------------------------
    def local_features(self, features) -> list[torch.Tensor]:
        """Per level [B, N, D]: CLIP-VV patch embeddings, or (``clip_vv`` false) the original path's."""
        if self.clip_vv:
            return features.patch_embeds
        return [self.backbone.project(tokens) for tokens in features.patch_tokens]

    def _abnormal_grid(self, features, text: torch.Tensor) -> torch.Tensor:
        """M^a on the patch grid [B, h, w] (eq. 9: the mean over levels); ``text`` [2, D] or [B, 2, D]."""
        batch = features.image_embed.shape[0]
        text = text.expand(batch, -1, -1) if text.ndim == 3 else text[None].expand(batch, -1, -1)
        levels = []
        for level, tokens in enumerate(self.local_features(features)):
            visual, words = self.bicmci[level](tokens, text) if self.bicmci is not None else (tokens, text)
            logits = CLIP_TEMPERATURE * F.normalize(visual, dim=-1) @ F.normalize(words, dim=-1).transpose(1, 2)
            levels.append(logits.softmax(-1)[..., 1])
        return torch.stack(levels).mean(0).view(batch, *features.grid)

    def _global_probability(self, features, text: torch.Tensor) -> torch.Tensor:
        """softmax(100 cos(Î_G, F_text))[abnormal] [B] (eq. 12's first term)."""
        image = features.image_embed if self.adapter is None else self.adapter(features.image_embed)
        logits = CLIP_TEMPERATURE * F.normalize(image, dim=-1)[:, None] @ F.normalize(text, dim=-1).transpose(-1, -2)
        return logits.softmax(-1)[:, 0, 1]

    def image_outputs(self, features, anchors: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(M^a at ``size``, M = G_sigma(M^a) (eq. 10), S_global / 2 (eq. 12)); ``anchors`` = F_text,
        [2, D] or [B, 2, D]. Takes the map size: the score is taken on the smoothed full map."""
        abnormal = upsample(self._abnormal_grid(features, anchors), size)
        smoothed = gaussian_blur(abnormal, self.sigma)
        return abnormal, smoothed, (self._global_probability(features, anchors) + smoothed.flatten(1).amax(1)) / 2

    def score_features(self, features, size) -> AnomalyScores:
        _, anomaly_map, image_score = self.image_outputs(features, self.anchors.stacked(), size)
        if self.memory is not None:
            anomaly_map, image_score = self.blend(anomaly_map, image_score,
                                                  gaussian_blur(self.memory_map(features, size), self.sigma))
        return AnomalyScores(image_score, anomaly_map)

    # ---- knowledge ----------------------------------------------------------------------
    def class_knowledge(self, class_name: str) -> torch.Tensor:
        """Unit text embeddings of the class's knowledge-pack descriptions [N, D] (frozen; cached)."""
        if class_name not in self._class_knowledge:
            self._class_knowledge[class_name] = self.backbone.encode_text(
                self.knowledge.descriptions(class_name, self._class_names(class_name)[0]))
        return self._class_knowledge[class_name]

    def begin_training(self, data) -> None:
        """Describe each anomalous training image from its mask and embed, per row, eq. 3's
        knowledge: the mean of its class's descriptions and its own (the VQA description)."""
        self.image_descriptions = [describe_anomaly(image, mask, self._class_names(name)[0]) if label else None
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
        per_class = {name: self.class_anchors(name) for name in sorted(set(batch.class_names))}
        text = torch.stack([per_class[name] for name in batch.class_names])  # [B, 2, D]
        abnormal, _, score = self.image_outputs(batch.features, text, batch.size)
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
