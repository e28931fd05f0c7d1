"""Per-stream scoring profiles: which method, asset class, threshold and references a stream uses.

A worker holds one backbone and one prepared method per distinct profile; streams match
profiles by glob pattern (first match wins, then the default).
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..datasets import IMAGE_SUFFIXES, load_image
from ..scoring.backbone import Backbone
from ..scoring.calibrate import calibration_threshold, reference_threshold
from ..scoring.checkpoint import load_checkpoint, read_header
from ..scoring.methods import AnomalyMethod, check_options, create_method
from ..scoring.prompts import PromptPack
from .anchors import AnchorCache

log = logging.getLogger(__name__)


class StreamProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str = "aprilgan"
    class_name: str = "insulator"  # a class of the prompt pack (power-line parts, or any object name)
    # "auto": from the calibration images when given, else from the references by
    # leave-one-out (scoring/calibrate.py), else 0.5; a number fixes it.
    threshold: float | Literal["auto"] = "auto"
    references: str | None = None  # folder of normal images of this asset: few-shot
    calibration: str | None = None  # folder of other normal images, for threshold "auto"
    shots: int | None = Field(default=None, ge=1)  # use the first N references (sorted); None: all
    options: dict[str, Any] = {}  # method options, e.g. {text_weight: 0}
    checkpoint: str | None = None  # a trained method from `linewatch train`; it names the method

    @model_validator(mode="before")
    @classmethod
    def _method_from_checkpoint(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("checkpoint") and "method" not in data:
            data = {**data, "method": read_header(data["checkpoint"])["method"]}
        return data

    def check(self) -> None:
        """Cheap checks that need no model, so a wrong config fails at start-up with its name."""
        check_options(self.method, dict(self.options))
        if self.checkpoint is not None:
            header = read_header(self.checkpoint)
            if header["method"] != self.method:
                raise ValueError(f"checkpoint {self.checkpoint} holds a {header['method']} model but the profile "
                                 f"says method {self.method}; leave --method out to use the checkpoint's")
            if self.options:
                raise ValueError(f"checkpoint {self.checkpoint}: method options are fixed at training; drop {dict(self.options)}")
        if self.references is not None:
            reference_paths(self.references, self.shots)
        if self.calibration is not None:
            reference_paths(self.calibration, None)

    def key(self) -> str:
        return self.model_dump_json()


def reference_paths(folder: str, shots: int | None) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"references folder not found: {folder}")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"references folder {folder} holds no images")
    return paths[:shots] if shots else paths


class ProfileTable:
    def __init__(self, default: StreamProfile, streams: dict[str, dict] | None = None):
        self.default = default
        self.patterns = [(pattern, StreamProfile.model_validate({**_inherited(default, overrides), **dict(overrides)}))
                         for pattern, overrides in (streams or {}).items()]
        for profile in self.profiles():
            profile.check()

    def profiles(self) -> list[StreamProfile]:
        return [self.default] + [p for _, p in self.patterns]

    def for_stream(self, stream: str) -> StreamProfile:
        for pattern, profile in self.patterns:
            if fnmatch.fnmatchcase(stream, pattern):
                return profile
        return self.default


def _inherited(default: StreamProfile, overrides: dict) -> dict:
    """What a stream inherits from the default profile: not the method and its options when
    the stream brings its own checkpoint (the checkpoint names them)."""
    base = default.model_dump()
    if overrides.get("checkpoint") and "method" not in overrides:
        base.pop("method")
        base.pop("options")
    return base


class PreparedProfile:
    """A method prepared for one profile: anchors from the cache, references in memory, threshold."""

    def __init__(self, profile: StreamProfile, backbone: Backbone, prompts: PromptPack, anchors: AnchorCache):
        self.profile = profile
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
        self.threshold, how = self._threshold(profile, references, text, backbone)
        log.info("%s/%s: threshold %.4f (%s)", profile.method, profile.class_name, self.threshold, how)
        self.anchor_key = key
        trained = self.method.checkpoint
        self.model = backbone.identity + (f"+checkpoint:{trained['identity']}" if trained else "")

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
