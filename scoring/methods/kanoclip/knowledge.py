"""KAnoCLIP's knowledge (Li et al., ICASSP 2025, §2.2.1): knowledge packs (data, not code) and
per-image anomaly descriptions from masks, the anomaly knowledge its L_KD pulls the learned
prompts towards. Why packs and mask-derived sentences stand in for the paper's GPT-3.5 and
Llama3 (VQA): ``README.md`` beside this file.

* **class knowledge** (the paper's n descriptions per class): ``KnowledgePack``, YAML; the
  bundled pack is ``knowledge.yaml`` beside this file (``origin: human-written``), a user
  passes their own;
* **image knowledge** (its m = 1 description per training image): ``describe_anomaly`` writes
  one sentence per anomalous training image from its mask and pixels (where, how large, what
  shape, what colour), in the form of the paper's VQA example.

A pack's ``digest`` (its content) goes into the checkpoint header and the anchor key.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path
from string import Formatter
from typing import Literal

import cv2
import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

DEFAULT_KNOWLEDGE = Path(__file__).parent / "knowledge.yaml"
MAX_WORDS = 40  # CLIP's text tower reads 77 tokens; a longer sentence would be cut silently


def _descriptions(values: list[str]) -> list[str]:
    if not values:
        raise ValueError("needs at least one description")
    for text in values:
        try:
            fields = [field for _, field, _, _ in Formatter().parse(text) if field is not None]
        except ValueError:
            fields = None  # a stray brace
        if fields is None or any(fields) or len(fields) > 1:
            raise ValueError(f"description {text!r} may hold one '{{}}' slot (the class name) and no other braces")
        if not text.strip() or len(text.split()) > MAX_WORDS:
            raise ValueError(f"description {text!r} must be 1 to {MAX_WORDS} words (CLIP reads 77 tokens)")
    return values


class KnowledgePack(BaseModel):
    """Per class, descriptions of what its anomalies look like; ``default`` for unlisted classes."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    origin: Literal["human-written", "llm-generated", "mixed"]  # who wrote the descriptions
    author: str = ""
    default: list[str]
    classes: dict[str, list[str]] = {}

    _checked = field_validator("default")(_descriptions)

    @field_validator("classes")
    @classmethod
    def _each_class(cls, classes: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, values in classes.items():
            try:
                _descriptions(values)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return classes

    @classmethod
    def load(cls, source: str | Path | dict | None = None) -> KnowledgePack:
        """The bundled pack (None), a YAML file, or a pack's content (a checkpoint's)."""
        if isinstance(source, dict):
            try:
                return cls.model_validate(source)
            except ValidationError as err:
                raise ValueError(f"knowledge pack is invalid: {err}") from None
        path = Path(source) if source else DEFAULT_KNOWLEDGE
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()))
        except FileNotFoundError:
            raise ValueError(f"knowledge pack not found: {path}") from None
        except OSError as err:
            raise ValueError(f"cannot read knowledge pack {path}: {err.strerror}") from None
        except (yaml.YAMLError, ValidationError) as err:
            raise ValueError(f"knowledge pack {path} is invalid: {err}") from None

    @property
    def digest(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def descriptions(self, class_name: str, display_name: str) -> list[str]:
        """The class's descriptions with ``{}`` read as ``display_name``."""
        return [text.format(display_name) for text in self.classes.get(class_name, self.default)]


# ---- one description per anomalous training image, from its mask -----------------------------

ROWS, COLUMNS = ("upper", "middle", "lower"), ("left", "centre", "right")


def describe_anomaly(image: torch.Tensor, mask: torch.Tensor, name: str) -> str | None:
    """One sentence on the anomaly of ``image`` [3, H, W] (RGB in [0, 1]) marked by ``mask``
    [H, W] (bool): how many regions, and of the largest where it is, how large, what shape and
    what colour, against its surroundings. None for an empty mask (a normal image)."""
    m = mask.detach().cpu().numpy().astype(np.uint8)
    if not m.any():
        return None
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(m, connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = labels == largest
    height, width = m.shape
    words = [_size(region.sum() / (height * width)), _shape(region)]
    pixels = image.detach().cpu().float().numpy().transpose(1, 2, 0)
    inside = pixels[region].mean(axis=0)
    ring = cv2.dilate(region.astype(np.uint8), np.ones((5, 5), np.uint8), iterations=3).astype(bool) & ~m.astype(bool)
    contrast = _contrast(inside, pixels[ring].mean(axis=0)) if ring.any() else "filling the whole image"
    colour = _colour(inside)
    place = _place(centroids[largest], region, height, width)
    regions = count - 1
    if regions == 1:
        return f"The {name} has a {words[0]}, {words[1]} {colour} defect {place}, {contrast}."
    return (f"The {name} has {_number(regions)} defective regions; the largest is a {words[0]}, {words[1]} "
            f"{colour} area {place}, {contrast}.")


def _number(n: int) -> str:
    return {2: "two", 3: "three", 4: "four", 5: "five"}.get(n, "several")


def _size(fraction: float) -> str:
    for limit, word in ((0.005, "tiny"), (0.03, "small"), (0.12, "medium-sized"), (0.35, "large")):
        if fraction < limit:
            return word
    return "very large"


def _shape(region: np.ndarray) -> str:
    ys, xs = np.nonzero(region)
    if len(ys) < 3:
        return "dot-like"
    spread = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(np.float64)) + 1e-6 * np.eye(2))
    elongation = float(np.sqrt(spread[1] / spread[0]))
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    if elongation > 3.0:
        return "thin, elongated"
    if fill > 0.9:
        return "rectangular"
    if fill > 0.6:
        return "roundish" if elongation < 1.6 else "oval"
    return "irregular"


def _place(centroid, region: np.ndarray, height: int, width: int) -> str:
    ys, xs = np.nonzero(region)
    if ys.max() - ys.min() > 0.8 * height and xs.max() - xs.min() > 0.8 * width:
        return "across most of the image"
    row = ROWS[min(int(3 * centroid[1] / height), 2)]
    column = COLUMNS[min(int(3 * centroid[0] / width), 2)]
    if row == "middle" and column == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {column}"
    if column == "centre":
        return f"at the {'top' if row == 'upper' else 'bottom'}"
    return f"in the {row} {column}"


HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"), (260, "blue"),
        (290, "purple"), (335, "pink"), (360, "red"))


def _colour(rgb: np.ndarray) -> str:
    hue, saturation, value = colorsys.rgb_to_hsv(*(float(c) for c in np.clip(rgb, 0, 1)))
    if saturation < 0.2 or value < 0.12:
        for limit, word in ((0.12, "black"), (0.35, "dark grey"), (0.65, "grey"), (0.85, "light grey")):
            if value < limit:
                return word
        return "white"
    name = next(word for limit, word in HUES if 360 * hue <= limit)
    return f"dark {name}" if value < 0.4 else name


def _contrast(inside: np.ndarray, around: np.ndarray) -> str:
    difference = float(inside.mean() - around.mean())
    if difference < -0.06:
        return "darker than its surroundings"
    if difference > 0.06:
        return "brighter than its surroundings"
    return "close to its surroundings in brightness"
