"""A scoring profile made ready on a backbone: its method, text anchors (from the cache),
reference memory and threshold.

A prepared profile remembers what its reference and calibration folders held (names, sizes,
modification times: ``folder_signature``); ``stale()`` tells the worker they changed (the
console adds a false alarm's frames there), and the worker prepares the profile again, with
no restart (``ScoringWorker._prepared``)."""

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
from .anchors import AnchorCache
from .profiles import StreamProfile, reference_paths

log = logging.getLogger(__name__)
_warned_random_zero_shot = False  # once per process


class PreparedProfile:
    """A method prepared for one profile: anchors from the cache, references in memory, threshold."""

    def __init__(self, profile: StreamProfile, backbone: Backbone, prompts: PromptPack, anchors: AnchorCache):
        self.profile = profile
        self.signature = folder_signature(profile)  # before reading: a change meanwhile is seen next time
        if profile.checkpoint is not None:  # brings its own prompt pack, the one it was trained with
            self.method: AnomalyMethod = load_checkpoint(profile.checkpoint, backbone)
        else:
            self.method = create_method(profile.method, backbone, prompts, **profile.options)
        key = self.method.anchor_key(profile.class_name)
        text = anchors.get(key, lambda: self.method.build_anchors(profile.class_name))
        references = None
        if profile.references is not None:
            paths = reference_paths(profile.references, profile.shots)
            references = torch.stack([load_image(p, backbone.image_size) for p in paths])
        self.method.prepare(profile.class_name, reference_images=references, anchors=text)
        if references is None and profile.checkpoint is None and backbone.config.weights == "none":
            _warn_random_zero_shot(profile)
        self.threshold, how = self._threshold(profile, references, text, backbone)
        log.info("%s/%s: threshold %.4f (%s)", profile.method, profile.class_name, self.threshold, how)
        self.anchor_key = key
        trained = self.method.checkpoint
        self.model = backbone.identity + (f"+checkpoint:{trained['identity']}" if trained else "")

    def stale(self) -> bool:
        """Its reference or calibration folder changed since it was prepared."""
        return folder_signature(self.profile) != self.signature

    def _threshold(self, profile: StreamProfile, references, text, backbone: Backbone) -> tuple[float, str]:
        if profile.threshold != "auto":
            return float(profile.threshold), "fixed"
        if profile.calibration is not None:
            paths = reference_paths(profile.calibration, None)
            images = torch.stack([load_image(p, backbone.image_size) for p in paths])
            return calibration_threshold(self.method, images), f"auto, {len(paths)} calibration images"
        if references is not None and len(references) > 1:
            value = reference_threshold(self.method, profile.class_name, references, text)
            self.method.prepare(profile.class_name, reference_images=references, anchors=text)  # LOO left a subset
            return value, "auto, leave-one-out over the references"
        return 0.5, "auto, zero-shot: abnormal more likely than normal"


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
