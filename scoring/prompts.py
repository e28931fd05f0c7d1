"""Prompt packs (data, not code) and the text anchors built from them.

Anchors follow WinCLIP's compositional ensemble and BAG-CLIP §3.1: every state phrase
of a class is put into every template, encoded, mean-pooled per state and L2-normalised
into T_N (normal) and T_A (abnormal).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from string import Formatter

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

DEFAULT_PACK = Path(__file__).parent / "prompt_packs" / "default.yaml"
ANCHOR_FORMAT = "v1"


def _has_slot(phrases: list[str]) -> list[str]:
    for phrase in phrases:
        try:
            fields = [field for _, field, _, _ in Formatter().parse(phrase) if field is not None]
        except ValueError:
            fields = None  # a stray brace
        if fields != [""]:
            raise ValueError(f"phrase {phrase!r} needs exactly one '{{}}' slot and no other braces")
    return phrases


class ClassPrompts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str] = []
    normal: list[str] = []  # extra normal states for this class
    abnormal: list[str] = []  # extra abnormal states for this class
    templates: list[str] = []  # extra templates for this class

    _slots = field_validator("normal", "abnormal", "templates")(_has_slot)


class StateWords(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normal: list[str]
    abnormal: list[str]

    _slots = field_validator("normal", "abnormal")(_has_slot)


class PromptPack(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    states: StateWords
    templates: list[str]
    classes: dict[str, ClassPrompts] = {}

    _slots = field_validator("templates")(_has_slot)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "PromptPack":
        path = Path(path) if path else DEFAULT_PACK
        try:
            return cls.model_validate(yaml.safe_load(path.read_text()))
        except FileNotFoundError:
            raise ValueError(f"prompt pack not found: {path}") from None
        except OSError as err:  # a directory, no permission
            raise ValueError(f"cannot read prompt pack {path}: {err.strerror}") from None
        except (yaml.YAMLError, ValidationError) as err:
            raise ValueError(f"prompt pack {path} is invalid: {err}") from None

    def prompts(self, class_name: str) -> tuple[list[str], list[str]]:
        """All normal and abnormal sentences for one class."""
        entry = self.classes.get(class_name) or ClassPrompts()
        names = entry.names or [class_name.replace("_", " ")]
        templates = self.templates + entry.templates

        def sentences(states: list[str]) -> list[str]:
            return [t.format(s.format(n)) for n in names for s in states for t in templates]

        return sentences(self.states.normal + entry.normal), sentences(self.states.abnormal + entry.abnormal)


@dataclass
class TextAnchors:
    """T_N and T_A, each [D], L2-normalised; `key` says what produced them."""

    normal: torch.Tensor
    abnormal: torch.Tensor
    key: str

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.normal, self.abnormal])  # [2, D]: index 1 is "abnormal"

    def to(self, device) -> "TextAnchors":
        return TextAnchors(self.normal.to(device), self.abnormal.to(device), self.key)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {"normal": self.normal.float().cpu().contiguous(), "abnormal": self.abnormal.float().cpu().contiguous()}
        return save(tensors, metadata={"key": self.key})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "TextAnchors":
        from safetensors.torch import load

        tensors = load(blob)
        # safetensors has no bytes-level metadata reader: the header is 8-byte length + JSON.
        key = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["key"]
        return cls(tensors["normal"], tensors["abnormal"], key)


def anchor_key(backbone_identity: str, normal: list[str], abnormal: list[str], extra: str = "") -> str:
    """Stable cache key: changes whenever the model, weights, any sentence or trained text part changes."""
    blob = json.dumps([ANCHOR_FORMAT, backbone_identity, normal, abnormal, extra], separators=(",", ":"))
    return f"anchors:{ANCHOR_FORMAT}:{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def mean_anchor(embeddings: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings.mean(dim=0), dim=-1)
