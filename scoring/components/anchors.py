"""Text anchors from an adapted text encoder: per state, the normalised mean of the prompt
ensemble's embeddings, as AA-CLIP builds its anchors. Users: ``aa-clip`` and ``core-clip``
(its t0, t1)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def ensemble_anchor(encode, sentences: list[str], sample: random.Random | None, limit: int | None) -> torch.Tensor:
    """[D]: the normalised mean of ``encode(sentences)``, one state's anchor. With ``sample``
    (training) up to ``limit`` sentences are drawn and the graph is kept; without, every
    sentence is encoded in chunks, without a graph."""
    if sample is not None and limit and len(sentences) > limit:
        sentences = sample.sample(sentences, limit)
    if sample is None:
        with torch.no_grad():
            embeds = torch.cat([encode(sentences[i:i + 256]) for i in range(0, len(sentences), 256)])
    else:
        embeds = encode(sentences)
    return F.normalize(embeds.mean(0), dim=-1)
