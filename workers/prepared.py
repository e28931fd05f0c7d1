"""A scoring profile made ready on a backbone: its method, text anchors (from the cache),
reference memory and threshold.

A prepared profile remembers what its reference and calibration folders held (names, sizes,
modification times: ``folder_signature``); ``stale()`` tells the worker they changed (the
console adds a false alarm's frames there), and the worker prepares the profile again, with
no restart (``reloader.ProfileReloader``). The memory and threshold are cached on disk by the
folders' content (``prepared_cache``), so a restart with the same inputs skips both."""

from __future__ import annotations

import logging
import os

import torch

from ..scoring.backbone import Backbone
from ..scoring.calibrate import calibration_threshold, reference_threshold
from ..scoring.checkpoint import load_checkpoint
from ..scoring.methods import AnomalyMethod, create_method
from ..scoring.pixels import load_image
from ..scoring.prompts import PromptPack
from ..ops.startup import STARTUP
from .anchors import AnchorCache
from .prepared_cache import PreparedCache, folder_digest, key_of
from .profiles import StreamProfile, reference_paths

log = logging.getLogger(__name__)
_warned_random_zero_shot = False  # once per process


class PreparedProfile:
    """A method prepared for one profile: anchors from the cache, references in memory, threshold.
    ``cache`` keeps the reference memory and the threshold across starts (``prepared_cache``);
    each stage is reported to ``ops.startup`` (a log line with its time, the console's state)."""

    def __init__(self, profile: StreamProfile, backbone: Backbone, prompts: PromptPack, anchors: AnchorCache,
                 cache: PreparedCache | None = None, compute: str = "fp32"):
        self.profile = profile
        self.signature = folder_signature(profile)  # before reading: a change meanwhile is seen next time
        cache = cache or PreparedCache(None)
        name = f"{profile.method}/{profile.class_name}"
        if profile.checkpoint is not None:  # brings its own prompt pack, the one it was trained with
            self.method: AnomalyMethod = load_checkpoint(profile.checkpoint, backbone)
        else:
            self.method = create_method(profile.method, backbone, prompts, **profile.options)
        key = self.method.anchor_key(profile.class_name)
        with STARTUP.stage("text anchors", f"text anchors of {name}"):
            text = anchors.get(key, lambda: self.method.build_anchors(profile.class_name))
        trained = self.method.checkpoint
        self.model = backbone.identity + (f"+checkpoint:{trained['identity']}" if trained else "")
        paths = reference_paths(profile.references, profile.shots) if profile.references is not None else []
        memory_key = key_of({"model": self.model, "backbone": repr(backbone.config), "method": profile.method,
                             "options": profile.options, "compute": compute, "device": backbone.device.type,
                             "references": folder_digest(paths), "blend": "standardised"})
        references = None
        if paths:
            with STARTUP.stage("reference memory", f"reference memory of {name} ({len(paths)} images)"):
                cached = cache.load_memory(memory_key)
                if cached is not None:
                    self.method.prepare(profile.class_name, anchors=text)
                    self.method.restore_memory(*cached)
                else:
                    references = _load(paths, backbone)
                    self.method.prepare(profile.class_name, reference_images=references, anchors=text)
                    cache.save_memory(memory_key, *self.method.memory_snapshot())
        else:
            self.method.prepare(profile.class_name, anchors=text)
        if not paths and profile.checkpoint is None and backbone.config.weights == "none":
            _warn_random_zero_shot(profile)
        self.threshold, how = self._threshold(profile, paths, references, backbone, cache,
                                              key_of({"memory": memory_key, "anchors": key}))
        log.info("%s: threshold %.4f (%s)", name, self.threshold, how)
        self.anchor_key = key

    @staticmethod
    def stages(profile: StreamProfile) -> int:
        """How many start-up stages preparing ``profile`` reports (``ops.startup``)."""
        references = len(reference_paths(profile.references, profile.shots)) if profile.references is not None else 0
        calibrates = profile.threshold == "auto" and (profile.calibration is not None or references > 1)
        return 1 + (references > 0) + calibrates

    def stale(self) -> bool:
        """Its reference or calibration folder changed since it was prepared."""
        return folder_signature(self.profile) != self.signature

    def _threshold(self, profile: StreamProfile, paths, references, backbone: Backbone, cache: PreparedCache,
                   key: str) -> tuple[float, str]:
        if profile.threshold != "auto":
            return float(profile.threshold), "fixed"
        if profile.calibration is None and len(paths) < 2:
            return 0.5, "auto, zero-shot: abnormal more likely than normal"
        calibration = reference_paths(profile.calibration, None) if profile.calibration is not None else []
        key = key_of({"of": key, "calibration": folder_digest(calibration)})
        what = f"{len(calibration)} calibration images" if calibration else f"leave-one-out over {len(paths)} references"
        with STARTUP.stage("calibrating", f"calibrating {profile.method}/{profile.class_name} ({what})"):
            cached = cache.load_threshold(key)
            if cached is not None:
                return cached[0], cached[1] + ", cached"
            if calibration:
                value, how = calibration_threshold(self.method, _load(calibration, backbone)), f"auto, {what}"
            else:
                references = references if references is not None else _load(paths, backbone)
                value, how = reference_threshold(self.method, references), f"auto, {what}"
            cache.save_threshold(key, value, how)
            return value, how


def _load(paths, backbone: Backbone) -> torch.Tensor:
    return torch.stack([load_image(p, backbone.image_size) for p in paths])


def _warn_random_zero_shot(profile: StreamProfile) -> None:
    global _warned_random_zero_shot
    if not _warned_random_zero_shot:
        _warned_random_zero_shot = True
        log.warning("%s/%s scores zero-shot on RANDOM weights (--weights none): its text anchors are noise, so its "
                    "scores mean nothing and most frames may be flagged anomalous. Give --references (few-shot), "
                    "pretrained --weights, or a trained --checkpoint.", profile.method, profile.class_name)


def folder_signature(profile: StreamProfile) -> tuple:
    """What the profile's reference and calibration folders hold: (name, size, mtime) of each
    image; a folder that cannot be read counts as empty."""
    from ..scoring.pixels import IMAGE_SUFFIXES

    out = []
    for folder in (profile.references, profile.calibration):
        entries = ()
        if folder is not None:
            try:
                entries = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)
                                       if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES))
            except OSError:
                pass
        out.append(entries)
    return tuple(out)
