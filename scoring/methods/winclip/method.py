"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023): the method's glue. Paper, choices and measurements: ``README.md``
beside this file.

Zero-shot: the class-token embedding of the whole image, and of every sliding window (the
ViT run on the class token plus only that window's patch tokens, ``encode_token_subsets``),
is compared with the text anchors; a window's score is its softmax probability of
"abnormal". Each patch takes the harmonic mean of the scores of the windows covering it
(``spread_to_patches``), per scale, and the scales (``window_sizes`` in patches, stride one
patch, and the whole image as the large scale) are combined by harmonic mean too.

Few-shot (WinCLIP+): a memory of normal reference features at the same scales, window
embeddings and the penultimate block's patch tokens. A window's score is
``0.5 * (1 - max cosine similarity to memory)``, harmonically aggregated onto the patches it
covers; the few-shot map is the arithmetic mean over scales, blended with the zero-shot map
and image score by ``text_weight`` (``AnomalyMethod.blend``). All windows of a batch run as
one batch of short sequences. WinCLIP uses its own taps, so the backbone's ``layers`` and V-V
path do not apply; references and scored images must share one size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...options import OPTIONS
from ..base import (
    AnomalyMethod,
    AnomalyScores,
    nearest_distance,
    register_method,
    upsample,
)


def window_index(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch indices of every size x size window, stride 1, row-major: [S, size*size]."""
    rows, cols = grid
    top = torch.arange(rows - size + 1)[:, None, None, None]
    left = torch.arange(cols - size + 1)[None, :, None, None]
    dy = torch.arange(size)[None, None, :, None]
    dx = torch.arange(size)[None, None, None, :]
    return ((top + dy) * cols + left + dx).flatten(2).flatten(0, 1)


def spread_to_patches(window_values: torch.Tensor, grid: tuple[int, int], size: int, harmonic: bool) -> torch.Tensor:
    """Aggregate per-window values [B, S] to per-patch [B, rows, cols] (mean or harmonic mean)."""
    rows, cols = grid
    values = window_values.float().view(-1, 1, rows - size + 1, cols - size + 1)
    if harmonic:
        values = 1.0 / values.clamp_min(1e-6)
    ones = torch.ones(1, 1, size, size, device=values.device)
    total = F.conv_transpose2d(values, ones)
    count = F.conv_transpose2d(torch.ones_like(values[:1]), ones)
    mean = total / count
    return (1.0 / mean if harmonic else mean)[:, 0]


@register_method
class WinCLIP(AnomalyMethod):
    """Window-level zero-shot text scores; WinCLIP+ adds a reference window/patch memory."""

    name = "winclip"
    Options = OPTIONS["winclip"]

    def __init__(self, backbone, prompts=None, **options):
        super().__init__(backbone, prompts, **options)
        self.window_sizes = tuple(self.options.window_sizes)
        self.penultimate = (max(backbone.depth - 1, 1),)
        self.memory: dict[str, torch.Tensor] | None = None
        self.memory_grid: tuple[int, int] | None = None
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _scales(self, grid: tuple[int, int]) -> list[int]:
        return [s for s in self.window_sizes if s <= min(grid)]

    def _index(self, grid: tuple[int, int], size: int) -> torch.Tensor:
        key = (grid, size)
        if key not in self._index_cache:
            self._index_cache[key] = window_index(grid, size).to(self.backbone.device)
        return self._index_cache[key]

    def _features(self, images: torch.Tensor):
        """Image embedding, penultimate patch tokens and window embeddings per scale."""
        embedded, grid = self.backbone.embed(images)
        features = self.backbone.forward_embedded(embedded, grid, layers=self.penultimate)
        windows = {size: self.backbone.encode_token_subsets(embedded, self._index(grid, size))
                   for size in self._scales(grid)}
        return features.image_embed, features.patch_tokens[0], windows, grid

    def fit_references(self, images: torch.Tensor | None) -> None:
        if images is None:
            self.memory = None
            return
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk in images.split(8):
            _, patches, windows, self.memory_grid = self._features(chunk)
            parts.setdefault("patch", []).append(patches.flatten(0, 1))
            for size, embeds in windows.items():
                parts.setdefault(f"window{size}", []).append(embeds.flatten(0, 1))
        self.memory = {name: torch.cat(chunks) for name, chunks in parts.items()}

    def memory_state(self) -> dict[str, torch.Tensor]:
        return dict(self.memory or {})

    def memory_meta(self) -> dict:
        return {"grid": list(self.memory_grid)} if self.memory is not None else {}

    def set_memory_state(self, state: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        self.memory = {name: t.to(self.backbone.device) for name, t in state.items()} if state else None
        if state:
            self.memory_grid = tuple((meta or {})["grid"])

    def score_batch(self, images: torch.Tensor) -> AnomalyScores:
        image_embed, patches, windows, grid = self._features(images)
        image_score = self.abnormal_probability(image_embed)  # [B]

        # Zero-shot: harmonic aggregation per window scale; the whole image is the large scale.
        zero_shot = [spread_to_patches(self.abnormal_probability(embeds), grid, size, harmonic=True)
                     for size, embeds in windows.items()]
        zero_shot.append(image_score[:, None, None].expand(-1, *grid))
        patch_map = len(zero_shot) / (1.0 / torch.stack(zero_shot).clamp_min(1e-6)).sum(dim=0)

        if self.memory is not None:
            if grid != self.memory_grid:
                raise ValueError(f"images give a {grid} patch grid but the references gave {self.memory_grid}: "
                                 "score images at the references' size")
            few_shot = [nearest_distance(patches, self.memory["patch"]).view(-1, *grid) / 2]
            for size, embeds in windows.items():
                distance = nearest_distance(embeds, self.memory[f"window{size}"]) / 2
                few_shot.append(spread_to_patches(distance, grid, size, harmonic=True))
            patch_map, image_score = self.blend(patch_map, image_score, torch.stack(few_shot).mean(dim=0))

        return AnomalyScores(image_score, upsample(patch_map, images.shape[-2:]))
