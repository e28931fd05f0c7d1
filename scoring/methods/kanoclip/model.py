"""KAnoCLIP's layers (Li et al., ICASSP 2025; torch modules only, the glue is ``method.py``):
one Bi-CMCI level (§2.4, Fig. 3 "BiCA") and the Conv-Adapter (eq. 11).

``BiCrossAttention``: pre-norm residual attention blocks in this order, all on tokens of the
joint image-text width:
  1. self-attention within each modality (visual tokens; text tokens);
  2. bi-directional cross-attention, both from the step-1 tokens: text -> visual (each visual
     token queries the text tokens) and visual -> text (each text token queries the visual
     tokens);
  3. a second self-attention over the visual tokens, plain where the paper uses a deformable
     one (why: ``README.md``, "Choices where the paper is silent"); the block is
     permutation-equivariant over patches and scores any grid size.
Attention runs in a bottleneck (inner width = width / 4, 4 heads) and every output projection
starts at zero, so an untrained block is the identity and training starts from CLIP's own
patch-text alignment (~1.3 M parameters a level at ViT-B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BOTTLENECK = 4  # attention inner width = token width / 4
HEADS = 4


class BottleneckAttention(nn.Module):
    """Multi-head attention whose queries, keys and values live in ``width / BOTTLENECK``;
    the output projection starts at zero (the residual block starts as the identity)."""

    def __init__(self, width: int, heads: int = HEADS):
        super().__init__()
        inner = max(width // BOTTLENECK, 1)
        while inner % heads:
            heads //= 2
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, inner) for _ in range(3))
        self.out = nn.Linear(inner, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """queries [B, Q, W], context [B, K, W] -> [B, Q, W]."""
        out = F.scaled_dot_product_attention(self._split(self.query(queries)), self._split(self.key(context)),
                                             self._split(self.value(context)))
        return self.out(out.transpose(1, 2).flatten(2))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, L, d]


class Residual(nn.Module):
    """x + attention(LN(x), LN'(context)) (cross), or x + attention(LN(x), LN(x)) (self)."""

    def __init__(self, width: int, cross: bool = False):
        super().__init__()
        self.norm_query = nn.LayerNorm(width)
        self.norm_context = nn.LayerNorm(width) if cross else None
        self.attention = BottleneckAttention(width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        query = self.norm_query(x)
        return x + self.attention(query, query if self.norm_context is None else self.norm_context(context))


class BiCrossAttention(nn.Module):
    """One Bi-CMCI level: visual [B, N, W] and text [B, T, W] tokens in, both refined out."""

    def __init__(self, width: int):
        super().__init__()
        self.visual_self, self.text_self = Residual(width), Residual(width)
        self.text_to_visual, self.visual_to_text = Residual(width, cross=True), Residual(width, cross=True)
        self.visual_refine = Residual(width)  # plain in place of the paper's deformable attention

    def forward(self, visual: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual, text = self.visual_self(visual), self.text_self(text)
        visual, text = self.text_to_visual(visual, text), self.visual_to_text(text, visual)
        return self.visual_refine(visual), text


class ConvAdapter(nn.Module):
    """KAnoCLIP's Conv-Adapter on the global image feature (eq. 11):
    ``ReLU(LN(I_G) W_down) W_up``, bottleneck ``dim / 4``. Fig. 4 draws a depthwise-separable
    convolution bottleneck; on a global feature (a 1 x 1 map) the depthwise convolution is a
    per-channel scale, which the LayerNorm's affine already is, and the pointwise convolutions
    are the two matrices of eq. 11, so this is eq. 11 as written (no bias, no residual)."""

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, max(dim // reduction, 1), bias=False)
        self.up = nn.Linear(max(dim // reduction, 1), dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.norm(x))))
