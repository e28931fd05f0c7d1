"""The few-shot blend: text (or trained head) evidence and reference-memory evidence on one scale.

The two terms come in different units: a softmax probability near 0 or 1 against a cosine
distance of a few hundredths. A weighted sum of raw terms lets whichever term spreads more
decide the ranking alone, whatever ``text_weight`` says. So each term is standardised first,
against its own distribution on normal images measured when the method is prepared: the text
term on the k references, the memory term leave-one-out (each reference against a memory of
the others, as a normal frame meets the memory). Maps use every pixel of those k maps, image
scores the k per-image values. The weighted sum of standard scores is expressed back in the
memory term's units, so ``text_weight`` 0 gives the memory's scores exactly and thresholds
keep their scale; ``text_weight`` 1 gives the text's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# A term whose spread on the references is below this (a saturated softmax: every reference
# 0.0 or 1.0) carries no measurable evidence on them; it is held to this spread instead of
# being divided by ~0, so its departures count, but in proportion.
MIN_SPREAD = 1e-4


@dataclass(frozen=True)
class TermScale:
    """Where one term sits on normal images: mean and standard deviation."""

    mean: float
    spread: float

    @classmethod
    def of(cls, values: torch.Tensor) -> TermScale:
        values = values.double().flatten()
        spread = values.std().item() if len(values) > 1 else 0.0
        return cls(values.mean().item(), max(spread, MIN_SPREAD))

    def standard(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.spread

    def units(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.spread + self.mean


@dataclass(frozen=True)
class BlendScales:
    """The four terms' scales, measured at ``prepare`` and kept with the reference memory."""

    text_map: TermScale
    memory_map: TermScale
    text_score: TermScale
    memory_score: TermScale

    @classmethod
    def measure(cls, terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> BlendScales:
        """From (text map, text score, memory map) of each reference, the memory map leave-one-out."""
        text_maps, text_scores, memory_maps = (torch.cat([t[i].float().cpu() for t in terms]) for i in range(3))
        return cls(TermScale.of(text_maps), TermScale.of(memory_maps), TermScale.of(text_scores),
                   TermScale.of(memory_maps.flatten(1).amax(dim=1)))

    def as_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict | None) -> BlendScales | None:
        return None if not meta else cls(**{name: TermScale(**scale) for name, scale in meta.items()})


def blend(text_map: torch.Tensor, text_score: torch.Tensor, memory_map: torch.Tensor, text_weight: float,
          scales: BlendScales | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(map, image score): ``text_weight`` of the text evidence and the rest of the memory's.
    The memory's image score is its map's maximum. Without ``scales`` (fewer than 2 references
    to measure them on) the raw terms are summed, as the papers do."""
    memory_score = memory_map.flatten(1).amax(dim=1)
    w = text_weight
    if w == 0:
        return memory_map, memory_score
    if w == 1:
        return text_map, text_score
    if scales is None:
        return w * text_map + (1 - w) * memory_map, w * text_score + (1 - w) * memory_score
    s = scales
    pixels = w * s.text_map.standard(text_map) + (1 - w) * s.memory_map.standard(memory_map)
    images = w * s.text_score.standard(text_score) + (1 - w) * s.memory_score.standard(memory_score)
    return s.memory_map.units(pixels), s.memory_score.units(images)
