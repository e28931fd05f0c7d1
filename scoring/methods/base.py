"""The one interface every scoring method implements, and the registry that names them.

Life cycle: ``prepare(class_name, reference_images=None, anchors=None)`` once per asset
class (text anchors, plus a memory of k normal reference images for few-shot), then
``score(images)`` per batch. Pure tensors: images are float RGB in [0, 1],
``[B, 3, H, W]`` at the backbone's image size; no I/O anywhere.

Trainable methods list their ``stages``; for each, ``stage_parameters`` and ``stage_loss``
on a batch of cached backbone features (see ``scoring.training``). Everything trained
lives outside ``backbone``, so ``trained_state()`` is what a checkpoint holds.

The text side is split out (``anchor_key`` / ``build_anchors``) so the pipeline can
fetch anchors from a cache by key instead of re-encoding prompts in every worker.

One hook vocabulary for what every method names alike ("what each method defines" below): on
the text side ``encode_prompts`` (one state's anchor) and ``class_anchors`` (a class's
(normal, abnormal) pair, which ``build_anchors`` wraps for inference and a text stage trains
through); on the image side ``image_outputs`` (the method's result against the anchors before
the memory blend, which ``score_features`` turns into scores and ``stage_loss`` trains
through); for training ``stages``, ``begin_training``, ``begin_stage``, ``stage_parameters``,
``stage_loss`` and ``end_training``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone, VisualFeatures
from ..blend import BlendScales, blend
from .. import plugins
from ..options import MethodOptions, canonical_method, validate
from ..prompts import PromptPack, TextAnchors, anchor_key, mean_anchor
from ..training import extract_features

CLIP_TEMPERATURE = 100.0  # CLIP's trained logit scale; the papers score text similarity with it
STATES = ("normal", "abnormal")  # the order of a class's anchors: index 1 is "abnormal"


@dataclass
class AnomalyScores:
    image_score: torch.Tensor  # [B], higher = more anomalous
    anomaly_map: torch.Tensor  # [B, H, W] at the input resolution


class AnomalyMethod(nn.Module):
    name: ClassVar[str] = ""
    # The form of the trained parts and their scoring; a checkpoint of another version is
    # refused (``version_note`` says what changed), never scored with a form it was not trained for.
    version: ClassVar[int] = 1
    version_note: ClassVar[str] = ""
    checkpoint: dict | None = None  # the header of the checkpoint this method was loaded from
    # The backbone's V-V attention path (CLIP-VV) is part of the method's form (KAnoCLIP):
    # a backbone without it is refused at construction, with the flag that adds it.
    needs_vv_attention: ClassVar[bool] = False

    # The options it takes, with their rules, defaults and meaning (``scoring.options``): a
    # subclass of ``MethodOptions``. The constructor validates its keyword options through it.
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, backbone: Backbone, prompts: PromptPack | None = None, **options):
        super().__init__()
        self.options = validate(self.Options, self.name or type(self).__name__, options)
        self.check_backbone(backbone.config)
        self.text_weight = self.options.text_weight
        self.memory_bank = self.options.memory_bank  # False: references are refused (MadCLIP and AA-CLIP use no memory bank)
        self.backbone = backbone
        self.prompt_pack = prompts or PromptPack.load()
        self.class_name: str | None = None
        self.anchors: TextAnchors | None = None
        self.memory: list[torch.Tensor] | None = None
        self.blend_scales: BlendScales | None = None  # measured by prepare (``scoring.blend``)
        self._blend_terms: list | None = None  # while measuring them: each reference's terms
        self._reference_features: VisualFeatures | None = None  # the last references' features, until measured

    @classmethod
    def check_backbone(cls, config) -> None:
        """Refuse a backbone configuration (``BackboneConfig``) this method's form cannot run on,
        before anything is built."""
        if cls.needs_vv_attention and not config.vv_attention:
            raise ValueError(f"{cls.name} needs the backbone's V-V attention path (CLIP-VV): build it with "
                             "--vv-attention (vv_attention: true; both of its presets have it)")

    # ---- text side ------------------------------------------------------------------
    def text_identity(self) -> str:
        """Identity of the text-side parameters that shape the anchors; '' for fixed prompts.
        Methods with learnable prompts or text adapters return a digest of those tensors, so
        anchors cached for one checkpoint are never served for another."""
        return ""

    def anchor_key(self, class_name: str) -> str:
        normal, abnormal = self.prompt_pack.prompts(class_name)
        return anchor_key(self.backbone.identity, normal, abnormal, self.text_identity())

    def build_anchors(self, class_name: str) -> TextAnchors:
        """``class_anchors`` for inference (no graph), with their cache key."""
        with torch.no_grad():
            normal, abnormal = self.class_anchors(class_name)
        return TextAnchors(normal, abnormal, self.anchor_key(class_name))

    # ---- life cycle -----------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, class_name: str, reference_images: torch.Tensor | None = None,
                anchors: TextAnchors | None = None) -> AnomalyMethod:
        self.anchors, self.class_name = None, None  # a failed prepare leaves the method unprepared, not half-old
        expected = self.anchor_key(class_name)
        if anchors is not None and anchors.key != expected:
            raise ValueError(f"anchors {anchors.key} were built for another model or prompt set (expected {expected})")
        if reference_images is not None and not self.memory_bank:
            raise ValueError(f"{self.name} was set up without a memory bank (memory_bank=false, as its paper), "
                             "so it takes no reference images: score zero-shot (eval --shots 0, no --references), "
                             "or train with --option memory_bank=true")
        anchors = (anchors or self.build_anchors(class_name)).to(self.backbone.device)
        references = None if reference_images is None else self._checked(reference_images)
        self.blend_scales = None
        self.fit_references(references)
        self.anchors, self.class_name = anchors, class_name
        try:
            if references is not None and len(references) > 1 and 0 < self.text_weight < 1:
                self.blend_scales = self.measure_blend(references)
        except BaseException:
            self.anchors, self.class_name = None, None
            raise
        finally:
            self._reference_features = None
        return self

    def measure_blend(self, references: torch.Tensor) -> BlendScales:
        """Each blend term's scale on normal images (``scoring.blend``): every reference scored
        with the others as its memory (their rows taken out of ``memory_state``), the terms
        recorded as they reach ``blend``. The full memory is back in place on return."""
        full, meta = self.memory_state(), self.memory_meta()
        k, terms = len(references), []
        # A method scoring from backbone features reuses the ones its memory was built from
        # (no second backbone pass over the references); one scoring from images runs them again.
        features = self._reference_features if type(self).score_batch is AnomalyMethod.score_batch else None
        size = tuple(references.shape[-2:])
        self._blend_terms = terms
        try:
            for i in range(k):
                self.set_memory_state({name: without_block(rows, i, k) for name, rows in full.items()}, meta)
                if features is not None:
                    self.score_features(features.select(torch.tensor([i])), size)
                else:
                    self.score_batch(references[i:i + 1])
        finally:
            self._blend_terms = None
            self.set_memory_state(full, meta)
        if len(terms) != k:
            raise RuntimeError(f"{self.name}: {len(terms)} blends for {k} references; score_batch must call blend "
                               "once per batch when it holds a memory")
        return BlendScales.measure(terms)

    def memory_snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The prepared memory as the start-up cache keeps it: ``memory_state``, and
        ``memory_meta`` with the blend's scales."""
        meta = dict(self.memory_meta())
        if self.blend_scales is not None:
            meta["blend_scales"] = self.blend_scales.as_meta()
        return self.memory_state(), meta

    def restore_memory(self, state: dict[str, torch.Tensor], meta: dict | None) -> None:
        """Install a ``memory_snapshot`` (of this method, backbone and options)."""
        meta = dict(meta or {})
        scales = BlendScales.from_meta(meta.pop("blend_scales", None))
        self.set_memory_state(state, meta)
        self.blend_scales = scales

    @torch.inference_mode()
    def score(self, images: torch.Tensor) -> AnomalyScores:
        if self.anchors is None:
            raise RuntimeError(f"{self.name}: call prepare(class_name) before score()")
        return self.score_batch(self._checked(images))

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return images.to(self.backbone.device, torch.float32)

    # ---- what each method defines ---------------------------------------------------
    def encode_prompts(self, class_name: str, state: str) -> torch.Tensor:
        """One state's anchor [D] (``state`` in ``STATES``): the normalised mean of the class's
        prompts for that state through the method's text side, differentiable in what the text
        side trains (learnable context words, text adapters). Default: the fixed prompt
        ensemble through the frozen text encoder."""
        return mean_anchor(self.backbone.encode_text(self.prompt_pack.prompts(class_name)[STATES.index(state)]))

    def class_anchors(self, class_name: str) -> torch.Tensor:
        """[2, D]: the (normal, abnormal) anchors of one class, each state's ``encode_prompts``;
        differentiable when the text side trains (``stage_loss`` calls it, ``build_anchors``
        wraps it for inference)."""
        return torch.stack([self.encode_prompts(class_name, state) for state in STATES])

    def image_outputs(self, features: VisualFeatures, anchors: torch.Tensor):
        """The method's image side against the anchors ([2, D], or [B, 2, D] one pair per image),
        before the memory blend: what ``score_features`` turns into scores and ``stage_loss``
        trains through. What it returns (and any further argument it takes) is each method's
        own, as its losses need: its docstring says. Methods that score otherwise (WinCLIP's
        ``score_batch``) leave it out."""
        raise NotImplementedError

    def fit_references(self, images: torch.Tensor | None) -> None:
        """Build (or, given None, clear) the few-shot memory from normal reference images.
        Default: APRIL-GAN's memory of the raw multi-level patch tokens (see ``memory_map``)."""
        if images is None:
            self.memory = None
            return
        self._reference_features = extract_features(self.backbone, images)
        self.memory = [level.flatten(0, 1) for level in self._reference_features.patch_tokens]

    def memory_state(self) -> dict[str, torch.Tensor]:
        """The reference memory as named tensors whose rows run reference by reference (the k
        references' rows in order, the same number each): what the start-up cache stores and
        what leave-one-out calibration takes one reference's rows out of. {} without a memory."""
        return {f"level{i}": level for i, level in enumerate(self.memory or [])}

    def memory_meta(self) -> dict:
        """JSON-able facts the memory needs besides its tensors (``set_memory_state``)."""
        return {}

    def set_memory_state(self, state: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Install a memory from ``memory_state`` / ``memory_meta`` (of this method and backbone)."""
        self.memory = [state[f"level{i}"].to(self.backbone.device) for i in range(len(state))] if state else None

    def memory_map(self, features: VisualFeatures, size: tuple[int, int]) -> torch.Tensor:
        """Few-shot map [B, H, W]: per level ``1 - max cosine similarity`` of each patch token to
        that level's reference memory, averaged over levels."""
        grid = features.grid
        few_shot = torch.stack([nearest_distance(tokens, memory).view(-1, *grid)
                                for tokens, memory in zip(features.patch_tokens, self.memory)]).mean(dim=0)
        return upsample(few_shot, size)

    def score_batch(self, images: torch.Tensor) -> AnomalyScores:
        return self.score_features(self.backbone(images), tuple(images.shape[-2:]))

    def score_features(self, features: VisualFeatures, size: tuple[int, int]) -> AnomalyScores:
        """Scores from the backbone's features of a batch, maps at ``size``."""
        raise NotImplementedError

    # ---- training (methods with something to train) ------------------------------------
    stages: ClassVar[tuple[str, ...]] = ()
    # masked views of the training images the stages see (``scoring.training.VIEWS``); () for none
    training_views: tuple[str, ...] = ()
    stage_lr: ClassVar[dict[str, float]] = {}  # the papers' learning rates per stage (default 1e-3)

    def begin_training(self, data) -> None:
        """Before the first stage, with the whole (augmented) ``scoring.training.TrainingSet``:
        per-image data a method derives from pixels and masks (KAnoCLIP describes each anomaly),
        read per batch through ``TrainBatch.index``."""

    def begin_stage(self, stage: str, class_names: list[str]) -> None:
        """Set up before a stage's first step (e.g. freeze the previous stage's anchors)."""

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def stage_loss(self, stage: str, batch) -> dict[str, torch.Tensor]:
        """Losses of one batch (``scoring.training.TrainBatch``); key ``loss`` is minimised."""
        raise NotImplementedError

    def end_training(self) -> None:
        """Drop whatever training cached (anchors prepared before training are stale now)."""
        self.anchors, self.class_name = None, None

    def checkpoint_options(self, options: dict) -> dict:
        """The options a checkpoint records to rebuild this method on any machine (a method
        replaces an option naming a local file by that file's content)."""
        return options

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the frozen backbone: what a checkpoint stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trained_state()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{self.name}: checkpoint tensors do not fit this method and backbone "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, "
                             f"other shapes {sorted(wrong)[:3]})")
        self.load_state_dict(state, strict=False)
        self.end_training()

    # ---- shared helpers ---------------------------------------------------------------
    def finish_scores(self, anomaly_map: torch.Tensor, image_score: torch.Tensor, features: VisualFeatures,
                      size: tuple[int, int]) -> AnomalyScores:
        """The text-side result, blended with the reference memory when there is one, then the map
        smoothed by the method's ``sigma``: how the trained methods end ``score_features``."""
        if self.memory is not None:
            anomaly_map, image_score = self.blend(anomaly_map, image_score, self.memory_map(features, size))
        return AnomalyScores(image_score, gaussian_blur(anomaly_map, self.sigma))

    def blend(self, text_map: torch.Tensor, text_score: torch.Tensor, reference_map: torch.Tensor):
        """Few-shot result: text (zero-shot or trained head) and reference-memory evidence,
        ``text_weight`` of the first, each on its scale on normal images (``scoring.blend``).
        The papers weigh both equally (0.5). With weights whose text side is meaningless
        (random init) or a domain far from CLIP's, 0 scores from the references alone."""
        if self._blend_terms is not None:
            self._blend_terms.append((text_map, text_score, reference_map))
        return blend(text_map, text_score, reference_map, self.text_weight, self.blend_scales)

    def abnormal_probability(self, embeds: torch.Tensor) -> torch.Tensor:
        """softmax over (normal, abnormal) of temperature-scaled cosine similarity; [...] -> [...]."""
        logits = CLIP_TEMPERATURE * F.normalize(embeds.float(), dim=-1) @ self.anchors.stacked().T
        return logits.softmax(dim=-1)[..., 1]


class FixedAnchorTraining:
    """For a trained method whose text anchors stay the fixed prompt ensemble (APRIL-GAN,
    BAG-CLIP): each class's anchors are built once per stage, a batch gets its images' own."""

    _train_anchors: dict[str, torch.Tensor] = {}

    def begin_stage(self, stage, class_names):
        with torch.no_grad():
            self._train_anchors = {c: self.class_anchors(c) for c in class_names}

    def batch_anchors(self, batch) -> torch.Tensor:
        """[B, 2, D]: (T_N, T_A) of each image's class."""
        return torch.stack([self._train_anchors[c] for c in batch.class_names])

    def end_training(self):
        super().end_training()
        self._train_anchors = {}


@contextmanager
def seeded_init(seed: int = 0):
    """Trainable parts start from one seeded initialisation, whatever the caller's RNG state:
    an untrained method (and its anchor key) is then the same in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1 - max cosine similarity of each query [B, N, C] to a memory [M, C] -> [B, N]."""
    memory = F.normalize(memory.float(), dim=-1)
    flat = F.normalize(queries.float(), dim=-1).flatten(0, -2)
    best = torch.cat([(part @ memory.T).amax(dim=-1) for part in flat.split(chunk)])
    return (1.0 - best).view(queries.shape[:-1])


def without_block(rows: torch.Tensor, i: int, k: int) -> torch.Tensor:
    """``rows`` (k equal blocks, one per reference, as ``memory_state`` keeps them) without block ``i``."""
    if len(rows) % k:
        raise ValueError(f"a memory of {len(rows)} rows does not split into {k} references")
    n = len(rows) // k
    return torch.cat([rows[:i * n], rows[(i + 1) * n:]])


def upsample(grid_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear."""
    return F.interpolate(grid_maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of [B, H, W] maps (as scipy's gaussian_filter, truncate=4; edges replicated)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


METHODS: dict[str, type[AnomalyMethod]] = {}


def register_method(cls: type[AnomalyMethod]) -> type[AnomalyMethod]:
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[AnomalyMethod]:
    """The method registered as ``name`` (a bundled one in any spelling: ``canonical_method``),
    bundled or from a package's entry point (``scoring.plugins``)."""
    name = canonical_method(name)
    if name not in METHODS and name in plugins.names():
        cls = plugins.load(name)
        if not (isinstance(cls, type) and issubclass(cls, AnomalyMethod)):
            raise ValueError(f"method {name!r} from {plugins.origin(name)} is not an AnomalyMethod subclass")
        register_method(cls)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted({*METHODS, *plugins.names()}))}")
    return METHODS[name]


def create_method(name: str, backbone: Backbone, prompts: PromptPack | None = None, **options) -> AnomalyMethod:
    """The method ``name`` built on ``backbone``; its constructor validates ``options`` (``Options``)."""
    return method_class(name)(backbone, prompts, **options)


def check_options(name: str, options: dict) -> None:
    """Name, option names and values through the method's ``Options`` (cheap: runs before any
    model is built; without torch, ``scoring.options.check_options`` does the same for the
    bundled methods)."""
    validate(method_class(name).Options, name, options)
