"""Training presets as data: one small JSON file per method and preset, like open_clip's
model configs. ``scoring/methods/<folder>/presets/<preset>.json`` ships with linewatch (the
folder is the method's name without hyphens: ``aa-clip`` -> ``aaclip``); a user's own file
works the same way (``linewatch train --preset my.json``).

Every trained method ships two:
  * ``paper``  the paper's (or, where it is silent, the authors' code's) backbone, image size,
               layers, schedule and choices, for machines that can run them (a GPU);
  * ``cpu``    what runs in minutes on a 2-core CPU: ViT-B-16 at 224 px and linewatch's
               schedule (the default of ``linewatch train``).

A file (all keys but ``options`` and the optional ones required; unknown keys are refused)::

    {"method": "madclip", "name": "paper", "description": "one line",
     "backbone": {"arch": "ViT-L-14-336", "weights": "openai", "image_size": 238,
                  "layers": [6, 12, 18, 24], "vv_attention": false},
     "options": {"memory_bank": false, "sigma": 0},
     "training": {"shots": 16, "views": 11,
                  "optimizer": {"name": "adam", "betas": [0.5, 0.999], "weight_decay": 0},
                  "stages": {"adapters": {"epochs": 60, "batch_size": 16, "lr": 0.001,
                                          "lr_milestones": [], "lr_gamma": 1.0}}},
     "source": {"backbone": "paper §3 ...", "training.stages.adapters.lr": "train.py --learning_rate ..."}}

How to add a preset (for a new method too):
  1. Write ``scoring/methods/<folder>/presets/<name>.json``. ``backbone.weights`` is an open_clip tag
     (or omit it: the command's ``--weights``, ``none`` by default); ``image_size`` must be a
     multiple of the patch size; ``options`` are the method's options (``linewatch methods
     NAME`` lists them; checked by name); ``training.stages`` names every stage of the method
     (``METHODS[name].stages``), in any order; ``shots`` only when the paper fixes them.
  2. ``source`` says where each number comes from: a key is a field path (``backbone``,
     ``training.stages.text.lr``, ``options.sigma``) and covers everything under it. Every
     value written in the file must be covered, and every key must name a field that exists. Cite the paper's
     section or the authors' repository and file; say where a number is ours and why.
  3. ``python -m pytest tests/test_presets.py`` validates every bundled file; ``linewatch
     methods --presets`` lists it. Write any way the preset departs from the paper in the
     method's README (``scoring/methods/<folder>/README.md``), in its deviations list.
Flags given to ``linewatch train`` override the preset's values; the checkpoint header records
the preset's name, file and content digest, and the settings actually used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METHODS_DIR = Path(__file__).parent / "methods"
DEFAULT_PRESET = "cpu"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackboneSpec(Strict):
    arch: str
    weights: str | None = None  # an open_clip tag such as "openai"; None: the command's --weights
    image_size: int | None = Field(None, ge=1)  # None: the architecture's
    layers: tuple[int, ...] | None = None  # 1-based blocks; None: four evenly spaced
    vv_attention: bool = False


class OptimizerSpec(Strict):
    name: Literal["adam", "adamw"] = "adam"  # torch.optim.Adam (L2 weight decay) or AdamW (decoupled)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value):
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must lie in [0, 1), got {list(value)}")
        return value


class StageSpec(Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    lr_milestones: tuple[int, ...] = ()  # optimiser steps within the stage after which lr *= lr_gamma
    lr_gamma: float = Field(1.0, gt=0)


class TrainingSpec(Strict):
    shots: int | None = Field(None, ge=1)  # k normal + k anomalous per class, when the paper fixes k
    views: int = Field(ge=1)
    optimizer: OptimizerSpec = OptimizerSpec()
    stages: dict[str, StageSpec]


class Preset(Strict):
    """One method's training preset; see the module docstring for the format and how to add one."""

    method: str
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str
    backbone: BackboneSpec
    options: dict[str, Any] = {}
    training: TrainingSpec
    source: dict[str, str]

    @model_validator(mode="after")
    def _fits_its_method_and_cites_its_numbers(self) -> "Preset":
        from .methods import check_options, method_class

        check_options(self.method, dict(self.options))  # unknown method or option: named
        stages = method_class(self.method).stages
        if set(self.training.stages) != set(stages):
            raise ValueError(f"training.stages must name the stages of {self.method} ({', '.join(stages)}), "
                             f"got {', '.join(self.training.stages) or 'none'}")
        meta = {"method", "name", "description", "source"}
        fields = _leaves(self.model_dump(exclude=meta))
        unknown = [key for key in self.source if not any(path == key or path.startswith(key + ".") for path in fields)]
        if unknown:
            raise ValueError(f"source names fields this preset does not have: {', '.join(unknown)}")
        written = _leaves(self.model_dump(exclude=meta, exclude_unset=True))  # defaults left out need no citation
        uncited = [path for path in written if not _covered(path, self.source)]
        if uncited:
            raise ValueError(f"source must say where every value comes from; missing: {', '.join(uncited)}")
        return self

    @property
    def digest(self) -> str:
        """Content hash of the validated preset: what the checkpoint header records."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value (a list is one value; an empty dict is none)."""
    if isinstance(tree, dict):
        return [path for key, value in tree.items() for path in _leaves(value, f"{prefix}{key}.")]
    return [prefix[:-1]]


def _covered(path: str, source: dict[str, str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in source for i in range(1, len(parts) + 1))


def bundled_folder(method: str) -> Path:
    """A bundled method's presets: ``presets/`` in its folder, ``scoring/methods/<name without
    hyphens>/`` (``tests/test_layout.py`` holds every bundled method to that folder name)."""
    return METHODS_DIR / method.replace("-", "") / "presets"


def shipped_folder(method: str) -> Path:
    """Where ``method``'s shipped presets are: linewatch's own folder, or for a package's method
    (``scoring.plugins``) its class's ``presets_dir``."""
    from .plugins import names

    if method not in names() or bundled_folder(method).is_dir():
        return bundled_folder(method)
    from .methods import method_class

    folder = getattr(method_class(method), "presets_dir", None)
    return Path(folder) if folder else bundled_folder(method)


def bundled(method: str | None = None) -> dict[str, list[str]]:
    """{method: [preset names]} of the presets shipped with linewatch (and, for one method
    from a package, with that package)."""
    if method is not None:
        names = sorted(path.stem for path in shipped_folder(method).glob("*.json"))
        return {method: names} if names else {}
    from .options import OPTIONS  # the bundled methods' names, without torch

    found = {name: sorted(path.stem for path in bundled_folder(name).glob("*.json")) for name in sorted(OPTIONS)}
    return {name: names for name, names in found.items() if names}


def preset_path(method: str | None, spec: str) -> Path:
    """A bundled preset's file (``spec`` a name) or the user's file (``spec`` a path)."""
    if spec.endswith(".json") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"preset file not found: {spec}")
        return path
    if method is None:
        raise ValueError(f"--preset {spec} names a bundled preset: give --method too (or a preset FILE)")
    path = shipped_folder(method) / f"{spec}.json"
    if not path.is_file():
        names = bundled(method).get(method, [])
        raise ValueError(f"{method} has no preset {spec!r}; bundled: {', '.join(names) or 'none'} "
                         "(or give a preset FILE.json)")
    return path


def load_preset(method: str | None, spec: str = DEFAULT_PRESET) -> tuple[Preset, Path]:
    """The preset ``spec`` (a bundled name or a file) for ``method``; a file may name the
    method itself (``method`` None), and must agree with it when both are given."""
    path = preset_path(method, spec)
    try:
        preset = Preset.model_validate_json(path.read_text())
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'preset'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"preset {path} is invalid: {problems}") from None
    except OSError as err:
        raise ValueError(f"cannot read preset {path}: {err.strerror}") from None
    if method is not None and preset.method != method:
        raise ValueError(f"preset {path} is for {preset.method}, not --method {method}")
    return preset, path


def describe(preset: Preset) -> str:
    """One line: backbone, schedule and choices (``linewatch methods --presets``)."""
    b, t = preset.backbone, preset.training
    backbone = (f"{b.arch}{'@' + b.weights if b.weights else ''} {b.image_size or 'native'} px"
                f"{', layers ' + ','.join(map(str, b.layers)) if b.layers else ''}{', V-V' if b.vv_attention else ''}")
    stages = "; ".join(f"{name} {s.epochs} ep, batch {s.batch_size}, lr {s.lr:g}"
                       + (f" x{s.lr_gamma:g} at steps {','.join(map(str, s.lr_milestones))}" if s.lr_milestones else "")
                       for name, s in t.stages.items())
    options = ", ".join(f"{k}={json.dumps(v)}" for k, v in preset.options.items())
    optimizer = {"adam": "Adam", "adamw": "AdamW"}[t.optimizer.name]
    return (f"{backbone}; {stages}; {optimizer} betas {tuple(t.optimizer.betas)}"
            f"{f', weight decay {t.optimizer.weight_decay:g}' if t.optimizer.weight_decay else ''}; "
            f"{t.views} view{'s' * (t.views > 1)}{f', {t.shots} shots' if t.shots else ''}"
            f"{f'; {options}' if options else ''}")


DEFAULT_SHOTS = 4  # when neither --shots nor the preset fixes k


ARCH_BOUND = ("weights", "image_size", "layers")  # meaningful only for the preset's own architecture


def backbone_config(preset: Preset, given: dict):
    """The preset's backbone with the explicitly given fields (flags, by field name) on top.
    Another ``arch`` drops the preset's weights tag, image size and layers (they belong to its
    architecture): that architecture's defaults apply unless those are given too."""
    from .backbone import BackboneConfig

    given = {k: v for k, v in given.items() if v is not None}
    spec = preset.backbone.model_dump(exclude_none=True)
    if given.get("arch", spec["arch"]) != spec["arch"]:
        spec = {k: v for k, v in spec.items() if k not in ARCH_BOUND}
    return BackboneConfig(**{**spec, **given})


def train_config(preset: Preset, seed: int = 0, epochs: int | None = None, lr: float | None = None,
                 batch_size: int | None = None, views: int | None = None):
    """The preset's schedule; ``epochs``, ``lr`` and ``batch_size`` when given set every stage's."""
    from .training import StageSchedule, TrainConfig

    t = preset.training
    stages = {name: StageSchedule(epochs=epochs or s.epochs, batch_size=batch_size or s.batch_size, lr=lr or s.lr,
                                  lr_milestones=tuple(s.lr_milestones), lr_gamma=s.lr_gamma)
              for name, s in t.stages.items()}
    first = next(iter(stages.values()))
    return TrainConfig(epochs=first.epochs, lr=lr, weight_decay=t.optimizer.weight_decay, batch_size=first.batch_size,
                       views=views or t.views, seed=seed, betas=tuple(t.optimizer.betas), stages=stages,
                       optimizer=t.optimizer.name)


def header_entry(preset: Preset, path: Path) -> dict:
    """What a checkpoint header records about the preset it was trained from."""
    shipped = path.resolve().is_relative_to(shipped_folder(preset.method).resolve())
    return {"name": preset.name, "file": f"bundled:{preset.method}/{path.name}" if shipped else str(path),
            "digest": preset.digest}
