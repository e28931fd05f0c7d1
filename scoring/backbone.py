"""The frozen open_clip backbone: text embeddings and multi-level patch features.

One factory (`Backbone.build`) makes every model from an open_clip architecture name
and a weights spec:
  * ``none``     random initialisation, seeded (no pretrained weights exist on CI);
  * a file path  ``.safetensors`` or a ``.pt``/``.bin`` state dict read with weights_only;
  * a tag        an open_clip pretrained tag such as ``openai`` (downloads on users' machines).

Images go in as float RGB in [0, 1], ``[B, 3, H, W]``; any H, W that are multiples of
the patch size work because positional embeddings are interpolated per grid size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .compat import import_open_clip
from .weights import WEIGHT_FILE_SUFFIXES, check_weights

open_clip = import_open_clip()
open_clip.add_model_config(Path(__file__).parent / "configs")  # registers linewatch-tiny
TINY_ARCH = "linewatch-tiny"


class BackboneError(ValueError):
    """A user-facing problem with the architecture, weights or image size."""


@dataclass(frozen=True)
class BackboneConfig:
    arch: str = "ViT-B-16"
    weights: str = "none"
    image_size: int | None = None  # None: the architecture's native size
    layers: tuple[int, ...] | None = None  # 1-based block indices; None: four evenly spaced
    vv_attention: bool = False  # CLIP Surgery / KAnoCLIP CLIP-VV local path for patch embeddings
    seed: int = 0


@dataclass
class VisualFeatures:
    image_embed: torch.Tensor  # [B, D] projected class token (not normalised)
    patch_tokens: list[torch.Tensor]  # per layer [B, N, W], raw residual stream
    patch_embeds: list[torch.Tensor]  # per layer [B, N, D], ln_post + proj (V-V path if enabled)
    grid: tuple[int, int]  # patch grid (rows, cols)
    local_tokens: list[torch.Tensor] | None = None  # per layer [B, N, W] before ln_post + proj (V-V path if enabled)

    def select(self, index: torch.Tensor) -> "VisualFeatures":
        """The features of a subset of the batch (training minibatches over cached features)."""
        pick = lambda tensors: [t[index] for t in tensors]  # noqa: E731
        return VisualFeatures(self.image_embed[index], pick(self.patch_tokens), pick(self.patch_embeds), self.grid,
                              None if self.local_tokens is None else pick(self.local_tokens))


def default_layers(depth: int, count: int = 4) -> tuple[int, ...]:
    """Evenly spaced 1-based blocks ending at the last: 24 -> (6, 12, 18, 24); shallow towers get fewer."""
    return tuple(sorted({max(1, int(depth * (i + 1) / count + 0.5)) for i in range(count)}))


def _weights_identity(weights: str, seed: int) -> str:
    if weights == "none":
        return f"random-seed{seed}"
    path = Path(weights)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return f"file-sha256:{digest.hexdigest()[:16]}"
    return f"tag:{weights}"


def _load_weights_file(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # truncated or not safetensors at all
            raise BackboneError(f"cannot read {path} as safetensors: {err}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # TorchScript archives and pickled objects land here
            raise BackboneError(
                f"cannot read {path} as a plain state dict with weights_only=True ({err.__class__.__name__}); "
                "convert it to .safetensors (open_clip models load with pretrained=TAG, then "
                "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'))") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} holds no state dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    open_clip.model.resize_pos_embed(state, model)
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise BackboneError(f"{path} does not fit this architecture: {len(missing)} missing keys (e.g. "
                            f"{sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # same names, other shapes
        raise BackboneError(f"{path} does not fit this architecture: {' '.join(str(err).split())[:400]}") from None


def _quiet_random_init(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


def _random_clip(arch: str, seed: int) -> nn.Module:
    """Seeded random init that leaves the caller's RNG state alone."""
    root = logging.getLogger()
    root.addFilter(_quiet_random_init)  # we name the weights ourselves
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return open_clip.create_model(arch, pretrained=None)
    finally:
        root.removeFilter(_quiet_random_init)


@contextlib.contextmanager
def _weights_loaded_after():
    """Build a model whose every weight is loaded right after (strictly) without initialising
    them first: ``torch.nn.init``'s in-place initialisers do nothing meanwhile (as transformers'
    ``no_init_weights``); random init of ViT-B-16 costs seconds that the load overwrites."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)


def create_clip(arch: str, weights: str, seed: int) -> nn.Module:
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower()[:5] in m.lower()][:8]
        raise BackboneError(f"unknown open_clip architecture {arch!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if weights == "none":
        return _random_clip(arch, seed)
    path = Path(weights)
    if path.suffix in WEIGHT_FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise BackboneError(f"weights file not found: {path}")
        with _weights_loaded_after():
            model = _random_clip(arch, seed)
        _load_weights_file(model, path)  # strict: every parameter and buffer of the state dict
        return model
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights not in tags:
        raise BackboneError(f"{arch} has no pretrained tag {weights!r}; known tags: {', '.join(tags) or 'none'}")
    try:
        check_weights(arch, weights)  # offline: one line now, not after the hub's retries
    except ValueError as err:
        raise BackboneError(str(err)) from None
    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    root.addFilter(_quiet_download_failure)  # the error below says it once, not each retry
    hub_level = hub.level
    hub.setLevel(logging.ERROR)  # here, after its import (which sets its own level)
    try:
        with _weights_loaded_after():  # open_clip loads a tag's whole checkpoint with strict=True
            return open_clip.create_model(arch, pretrained=weights)
    except Exception as err:  # offline, hub errors, disk full: say which weights could not be had
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 200 else reason[:200] + "…"
        raise BackboneError(f"could not fetch pretrained weights {arch}/{weights} ({reason}); "
                            "pass --weights FILE to use a local copy") from None
    finally:
        root.removeFilter(_quiet_download_failure)
        hub.setLevel(hub_level)


def _quiet_download_failure(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to download")


class Backbone(nn.Module):
    """Frozen CLIP with the feature taps every method uses."""

    def __init__(self, clip: nn.Module, config: BackboneConfig, weights_identity: str):
        super().__init__()
        visual = clip.visual
        plain_vit = (isinstance(visual, open_clip.transformer.VisionTransformer) and visual.attn_pool is None
                     and visual.pool_type == "tok" and not visual.final_ln_after_pool
                     and all(type(b) is open_clip.transformer.ResidualAttentionBlock for b in visual.transformer.resblocks))
        if not plain_vit:
            # Class-token taps, window passes and V-V attention assume CLIP's own ViT layout.
            raise BackboneError(f"{config.arch}: linewatch needs a class-token ViT image tower with standard "
                                f"attention blocks (OpenAI/LAION-style ViT-*), not {type(visual).__name__}")
        self.clip = clip.eval().requires_grad_(False)
        self.config = config
        self.weights_identity = weights_identity
        try:
            self.tokenizer = open_clip.get_tokenizer(config.arch)
        except Exception as err:  # SigLIP-style tokenizers come from the HF hub
            raise BackboneError(f"could not load the tokenizer of {config.arch}: {err}") from err
        self.patch_size = visual.patch_size[0]
        self.depth = len(visual.transformer.resblocks)
        self.image_size = config.image_size or visual.image_size[0]
        if self.image_size % self.patch_size:
            raise BackboneError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        self.layers = tuple(config.layers or default_layers(self.depth))
        if not all(1 <= layer <= self.depth for layer in self.layers):
            raise BackboneError(f"layers {self.layers} outside 1..{self.depth} for {config.arch}")
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1), persistent=False)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        # Autocast dtype of the image tower's blocks (None: float32); set with `computing_in`.
        self.compute_dtype: torch.dtype | None = None

    @classmethod
    def build(cls, config: BackboneConfig = BackboneConfig(), device: str | torch.device = "cpu") -> "Backbone":
        clip = create_clip(config.arch, config.weights, config.seed)
        return cls(clip, config, _weights_identity(config.weights, config.seed)).to(device)

    @property
    def identity(self) -> str:
        """Architecture and weights: part of every anchor key and checkpoint header."""
        return f"{self.config.arch}@{self.weights_identity}"

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def embed_dim(self) -> int:
        return self.clip.visual.proj.shape[1]

    @property
    def width(self) -> int:
        return self.clip.visual.transformer.width

    # ---- text -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str], chunk: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings [N, D]."""
        out = [self.encode_tokens(self.tokenize(texts[i:i + chunk])) for i in range(0, len(texts), chunk)]
        return F.normalize(torch.cat(out).float(), dim=-1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [N, L], cut after the longest sentence's end token: the causal mask makes
        the end token's output independent of the padding behind it, and short prompts then
        cost ~8x less than CLIP's fixed 77 positions."""
        tokens = self.tokenizer(texts).to(self.device)
        return tokens[:, :int(tokens.argmax(dim=-1).max()) + 1]

    def encode_tokens(self, tokens: torch.Tensor, embeddings: torch.Tensor | None = None,
                      after_block=None, projection=None) -> torch.Tensor:
        """The text tower on token ids [N, L] (not normalised, differentiable).

        Hooks for trained text-side parts: ``embeddings`` replaces the token embeddings
        (learnable context words), ``after_block(index, x)`` rewrites the residual stream after
        a block (index from 0; text adapters), ``projection`` replaces ``text_projection``.
        The end token is the highest id in each row, as in CLIP.
        """
        clip = self.clip
        length = tokens.shape[1]
        x = clip.token_embedding(tokens) if embeddings is None else embeddings
        x = x + clip.positional_embedding[:length]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        batch_first = getattr(clip.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        for index, block in enumerate(clip.transformer.resblocks):
            x = block(x, attn_mask=mask)
            if after_block is not None:
                x = after_block(index, x if batch_first else x.transpose(0, 1))
                x = x if batch_first else x.transpose(0, 1)
        x = x if batch_first else x.transpose(0, 1)
        pooled = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        if projection is not None:
            return projection(pooled)
        return pooled @ clip.text_projection if not isinstance(clip.text_projection, nn.Linear) else clip.text_projection(pooled)

    # ---- image ------------------------------------------------------------------------
    @contextlib.contextmanager
    def computing_in(self, dtype: torch.dtype | None):
        """Inside this block the image tower's convolution, attention and MLP run under
        ``torch.autocast`` to ``dtype`` (bf16/fp16; None: float32). The residual stream and every
        returned feature stay float32: the methods' heads compare features at temperature 100
        and by 1 - cosine, where a bf16 rounding (~0.4 %) would move scores visibly."""
        previous, self.compute_dtype = self.compute_dtype, dtype
        try:
            yield self
        finally:
            self.compute_dtype = previous

    def _autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _positional(self, rows: int, cols: int) -> torch.Tensor:
        pos = self.clip.visual.positional_embedding
        native = self.clip.visual.grid_size
        if (rows, cols) == tuple(native):
            return pos
        key = (rows, cols)
        if key not in self._pos_cache or self._pos_cache[key].device != pos.device:
            grid = pos[1:].reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2)
            # antialias as open_clip's resize_pos_embed, so a model built at this size matches
            grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(pos.dtype)
            self._pos_cache[key] = torch.cat([pos[:1], grid])
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalise, patchify, add class token and positions: tokens [B, 1+N, W] after ln_pre."""
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise BackboneError(f"image {height}x{width} is not a multiple of the patch size {self.patch_size}")
        visual = self.clip.visual
        with self._autocast():
            x = visual.conv1((images.to(self.mean.dtype) - self.mean) / self.std)
        x = x.to(self.mean.dtype)  # the residual stream stays float32 under autocast
        rows, cols = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_token, x], dim=1) + self._positional(rows, cols).to(x.dtype)
        return visual.ln_pre(x), (rows, cols)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post + proj: residual-stream tokens into the joint image-text space."""
        return self.clip.visual.ln_post(tokens) @ self.clip.visual.proj

    def forward(self, images: torch.Tensor, layers: tuple[int, ...] | None = None) -> VisualFeatures:
        return self.forward_embedded(*self.embed(images), layers=layers)

    def forward_embedded(self, x: torch.Tensor, grid: tuple[int, int], layers: tuple[int, ...] | None = None) -> VisualFeatures:
        """Run the blocks on `embed` output; tap `layers` (default: the configured ones)."""
        layers = layers or self.layers
        vv_start = min(layers) if self.config.vv_attention else None
        vv = None
        patch_tokens, local_tokens = [], []
        dtype = self.mean.dtype
        with self._autocast():
            for index, block in enumerate(self.clip.visual.transformer.resblocks, start=1):
                if vv_start is not None and index >= vv_start:
                    # CLIP-VV dual path: S_l = S_{l-1} + Proj(Attn(V, V, V)), V from the original path.
                    vv = (x if vv is None else vv) + block.ls_1(_vv_attention(block.attn, block.ln_1(x)))
                x = block(x)
                if index in layers:
                    patch_tokens.append(x[:, 1:].to(dtype))
                    local_tokens.append(vv[:, 1:].to(dtype) if vv is not None else patch_tokens[-1])  # one tensor when no V-V path
            image_embed = self.project(x[:, 0]).to(dtype)
            patch_embeds = [self.project(t).to(dtype) for t in local_tokens]
        return VisualFeatures(image_embed, patch_tokens, patch_embeds, grid, local_tokens)

    def encode_token_subsets(self, embedded: torch.Tensor, index: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Class embedding of the ViT run on the class token plus a subset of patch tokens.

        WinCLIP's window embeddings: ``index`` [S, k] lists the patch indices of S windows;
        all B x S windows run as one batch of short sequences. Returns [B, S, D].
        """
        batch, subsets = embedded.shape[0], index.shape[0]
        patches = embedded[:, 1:][:, index.to(embedded.device)]  # [B, S, k, W]
        seqs = torch.cat([embedded[:, :1, None].expand(-1, subsets, -1, -1), patches], dim=2)
        seqs = seqs.flatten(0, 1)
        out = []
        with self._autocast():
            for start in range(0, seqs.shape[0], chunk):
                x = seqs[start:start + chunk]
                for block in self.clip.visual.transformer.resblocks:
                    x = block(x)
                out.append(self.project(x[:, 0]).to(embedded.dtype))
        return torch.cat(out).view(batch, subsets, -1)


def _vv_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Self-attention with query = key = value = V (CLIP Surgery), same weights as ``attn``."""
    width, heads = attn.embed_dim, attn.num_heads
    v = F.linear(x, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None)
    v = v.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # [B, h, L, d]
    out = F.scaled_dot_product_attention(v, v, v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)

