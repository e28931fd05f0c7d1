"""Few-shot training of a method's small parts on a frozen backbone (pure tensors, no I/O).

The backbone never changes, so each training image's features are computed once: a few
augmented views per image (flips, quarter turns, brightness/contrast) go through the
frozen ViT under ``no_grad`` and the epochs then run over those cached features. That
makes a 60-epoch run cost one backbone pass per view instead of one per step, which is
what lets ViT-B-16 train on a 2-core CPU in minutes.

Methods that learn from where the subject is (CoRe-CLIP) name ``training_views``: the
subject alone and the scene without it, made from each image's optional subject mask
(``masked_view``) and cached the same way; at test time no mask is needed.

Methods train in stages (AA-CLIP has two); each stage names its parameters and its loss,
and may have its own epochs, batch size, rate and step schedule (``StageSchedule``, which the
presets in ``scoring/methods/<folder>/presets/`` fill in). The optimiser is Adam (or AdamW) with the
configured betas.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .backbone import Backbone, VisualFeatures


@dataclass
class TrainingSet:
    images: torch.Tensor  # [N, 3, S, S] float RGB in [0, 1]
    masks: torch.Tensor  # [N, S, S] bool; all False for normal images
    labels: torch.Tensor  # [N] 0 normal, 1 anomalous
    class_names: list[str]
    # Optional: where the subject is ([N, S, S] bool) and which images have such a mask ([N] bool)
    subject_masks: torch.Tensor | None = None
    subject_known: torch.Tensor | None = None

    def __post_init__(self):
        n = self.images.shape[0]
        if not (self.masks.shape[0] == self.labels.shape[0] == len(self.class_names) == n):
            raise ValueError("images, masks, labels and class_names must have one entry per image")
        if self.masks.shape[-2:] != self.images.shape[-2:]:
            raise ValueError(f"masks {tuple(self.masks.shape[-2:])} and images {tuple(self.images.shape[-2:])} differ in size")
        if (self.subject_masks is None) != (self.subject_known is None):
            raise ValueError("subject_masks and subject_known come together")
        if self.subject_masks is not None and (self.subject_masks.shape != self.masks.shape
                                               or self.subject_known.shape != (n,)):
            raise ValueError(f"subject masks {tuple(self.subject_masks.shape)} must match masks {tuple(self.masks.shape)}, "
                             f"with one known flag per image")


@dataclass
class TrainBatch:
    features: VisualFeatures
    masks: torch.Tensor  # [B, S, S] float
    labels: torch.Tensor  # [B] long
    class_names: list[str]
    size: tuple[int, int]
    index: torch.Tensor | None = None  # the batch's rows of the training set (what begin_training saw)
    # features of the masked views a method trains on (``training_views``), by view name; an
    # image without a subject mask has its own features there
    views: dict[str, VisualFeatures] = field(default_factory=dict)


VIEWS = ("subject", "context")


def masked_view(images: torch.Tensor, subject_masks: torch.Tensor, view: str) -> torch.Tensor:
    """The subject alone (zero elsewhere) or the scene without it (zero on the subject);
    images [N, 3, S, S], subject masks [N, S, S] bool. Zero is black, CoRe-CLIP's pixel-wise masking."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    keep = subject_masks if view == "subject" else ~subject_masks
    return images * keep[:, None].to(images.dtype)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class StageSchedule:
    """One stage's schedule. The rate is multiplied by ``lr_gamma`` after each optimiser step
    count in ``lr_milestones`` (counted within the stage, as torch's MultiStepLR stepped per batch)."""
    epochs: int = 30
    batch_size: int = 8
    lr: float | None = None  # None: the paper's rate for this stage (method.stage_lr)
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 1.0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if list(self.lr_milestones) != sorted(set(self.lr_milestones)) or any(m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be increasing step counts >= 1, got {list(self.lr_milestones)}")
        if not self.lr_gamma > 0:
            raise ValueError(f"lr_gamma must be > 0, got {self.lr_gamma}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # per stage, for stages without an entry in `stages`
    lr: float | None = None  # None: each stage's rate from its paper (method.stage_lr)
    weight_decay: float = 0.0  # L2 for "adam", decoupled for "adamw"; 0 in every paper
    batch_size: int = 8
    views: int = 4  # augmented views per image; the first is the image itself
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's; the authors of AA-CLIP and MadCLIP use (0.5, 0.999)
    stages: dict[str, StageSchedule] = field(default_factory=dict)  # per-stage schedules (presets)
    optimizer: str = "adam"  # "adam" (the papers') or "adamw"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "views"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")

    def stage(self, name: str) -> StageSchedule:
        return self.stages.get(name) or StageSchedule(self.epochs, self.batch_size, self.lr)

    def total_epochs(self, stages: tuple[str, ...]) -> int:
        return sum(self.stage(name).epochs for name in stages)


def optimizer_for(parameters: list, schedule: StageSchedule, default_lr: float, config: TrainConfig):
    """(optimizer, scheduler) of one stage: Adam or AdamW at the stage's rate with the
    configured betas, and the stage's step schedule (stepped once per batch)."""
    optimizer = OPTIMIZERS[config.optimizer](parameters, lr=schedule.lr or default_lr, betas=tuple(config.betas),
                                             weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(schedule.lr_milestones), schedule.lr_gamma)
    return optimizer, scheduler


# (stage, epoch, step within epoch, steps per epoch, losses of this step)
ProgressCallback = Callable[[str, int, int, int, dict[str, float]], None]


def augment(data: TrainingSet, views: int, generator: torch.Generator) -> TrainingSet:
    """``views`` copies of every image: the original, then random flips, quarter turns and a
    mild brightness/contrast change; masks follow the geometry. Square images only (the
    loaders squash every image to a square), so a quarter turn keeps the shape."""
    subjects = data.subject_masks if data.subject_masks is not None else torch.zeros_like(data.masks)
    images, masks, subject_masks = [data.images], [data.masks], [subjects]
    for _ in range(views - 1):
        x, m, s = data.images.clone(), data.masks.clone(), subjects.clone()
        for i in range(x.shape[0]):
            turns = int(torch.randint(4, (1,), generator=generator))
            flip = bool(torch.randint(2, (1,), generator=generator))
            xi, mi, si = torch.rot90(x[i], turns, (1, 2)), torch.rot90(m[i], turns, (0, 1)), torch.rot90(s[i], turns, (0, 1))
            if flip:
                xi, mi, si = xi.flip(-1), mi.flip(-1), si.flip(-1)
            gain, shift = 1 + 0.2 * (torch.rand(2, generator=generator) - 0.5)
            mean = xi.mean()
            x[i] = ((xi - mean) * gain + mean + (shift - 1)).clamp(0, 1)
            m[i], s[i] = mi, si
        images.append(x)
        masks.append(m)
        subject_masks.append(s)
    known = None if data.subject_known is None else data.subject_known.repeat(views)
    return TrainingSet(torch.cat(images), torch.cat(masks), data.labels.repeat(views), data.class_names * views,
                       None if known is None else torch.cat(subject_masks), known)


@torch.no_grad()
def extract_features(backbone: Backbone, images: torch.Tensor, chunk: int = 8,
                     on_chunk: Callable[[int], None] | None = None) -> VisualFeatures:
    """Frozen-backbone features of every image, concatenated (kept on the backbone's device)."""
    parts = []
    for start in range(0, images.shape[0], chunk):
        parts.append(backbone(images[start:start + chunk].to(backbone.device)))
        if on_chunk:
            on_chunk(min(chunk, images.shape[0] - start))
    cat = lambda lists: [torch.cat(level) for level in zip(*lists)]  # noqa: E731
    patch_tokens = cat([p.patch_tokens for p in parts])
    shared = parts[0].local_tokens[0] is parts[0].patch_tokens[0]  # no V-V path: the same tensors, keep one copy
    return VisualFeatures(torch.cat([p.image_embed for p in parts]), patch_tokens, cat([p.patch_embeds for p in parts]),
                          parts[0].grid, patch_tokens if shared else cat([p.local_tokens for p in parts]))


def view_features(backbone: Backbone, data: TrainingSet, features: VisualFeatures,
                  views: tuple[str, ...]) -> dict[str, VisualFeatures]:
    """Features of each masked view of ``data``; images without a subject mask keep their
    own features (the backbone runs only on the images that have one)."""
    out = {}
    known = (torch.zeros(len(data.labels), dtype=torch.bool) if data.subject_known is None
             else data.subject_known.cpu()).nonzero()[:, 0]
    for view in views:
        if not len(known):
            out[view] = features
            continue
        part = extract_features(backbone, masked_view(data.images[known], data.subject_masks[known], view))
        rows = known.to(features.image_embed.device)

        def put(whole: torch.Tensor, rows_: torch.Tensor) -> torch.Tensor:
            whole = whole.clone()
            whole[rows] = rows_
            return whole

        shared = features.local_tokens is None or features.local_tokens[0] is features.patch_tokens[0]
        tokens = [put(t, p) for t, p in zip(features.patch_tokens, part.patch_tokens)]
        out[view] = VisualFeatures(put(features.image_embed, part.image_embed), tokens,
                                   [put(t, p) for t, p in zip(features.patch_embeds, part.patch_embeds)], features.grid,
                                   tokens if shared else [put(t, p) for t, p in zip(features.local_tokens, part.local_tokens)])
    return out


def fit(method, data: TrainingSet, config: TrainConfig = TrainConfig(), features: VisualFeatures | None = None,
        progress: ProgressCallback | None = None) -> list[dict]:
    """Train ``method``'s stages on ``data`` (augmented here unless ``features`` are given for
    already-augmented ``data``). Deterministic for a seed. Returns per-epoch mean losses."""
    if not method.stages:
        raise ValueError(f"{method.name} has nothing to train")
    if features is None:  # augmentation and batch order draw from their own seeded streams
        data = augment(data, config.views, torch.Generator().manual_seed(config.seed))
        features = extract_features(method.backbone, data.images)
    views = view_features(method.backbone, data, features, method.training_views)
    generator = torch.Generator().manual_seed(config.seed)
    device = method.backbone.device
    masks, labels = data.masks.to(device, torch.float32), data.labels.to(device).long()
    size = tuple(data.images.shape[-2:])
    history = []
    method.begin_training(data)
    for stage in method.stages:
        method.begin_stage(stage, sorted(set(data.class_names)))
        parameters = method.stage_parameters(stage)
        for parameter in parameters:
            parameter.requires_grad_(True)
        schedule = config.stage(stage)
        optimizer, scheduler = optimizer_for(parameters, schedule, method.stage_lr.get(stage, 1e-3), config)
        steps = -(-len(labels) // schedule.batch_size)
        for epoch in range(schedule.epochs):
            order = torch.randperm(len(labels), generator=generator)
            totals: dict[str, float] = {}
            for step, index in enumerate(order.split(schedule.batch_size)):
                index = index.to(device)
                batch = TrainBatch(features.select(index), masks[index], labels[index],
                                   [data.class_names[i] for i in index.tolist()], size, index,
                                   {view: f.select(index) for view, f in views.items()})
                losses = method.stage_loss(stage, batch)
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                optimizer.step()
                scheduler.step()
                values = {k: float(v.detach()) for k, v in losses.items()}
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value / steps
                if progress:
                    progress(stage, epoch, step, steps, values)
            history.append({"stage": stage, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **totals})
        for parameter in parameters:
            parameter.requires_grad_(False)
    method.end_training()
    return history


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Content hash of trained tensors: names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
