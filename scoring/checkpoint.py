"""Checkpoints: safetensors with only the trained tensors and a JSON header.

The header (safetensors metadata key ``linewatch``) names the method, the version of its form
and its options, the backbone it was trained on (architecture, weights identity, image size,
tapped layers, V-V path), the whole prompt pack, the preset it was trained from (name, file,
content digest), how it was trained, and the trained tensors' digest. Loading refuses a
backbone that differs in any of those, and a checkpoint of another version of its method's
form, with a message naming both sides. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from .backbone import Backbone, BackboneConfig
from .methods import METHODS, AnomalyMethod, create_method
from .prompts import PromptPack
from .training import state_digest

FORMAT = "linewatch-checkpoint/1"
METADATA_KEY = "linewatch"
HEADER_FIELDS = {"method": str, "options": dict, "backbone": dict, "prompts": dict, "training": dict, "identity": str}
BACKBONE_FIELDS = {"arch", "weights", "weights_identity", "seed", "image_size", "layers", "vv_attention"}


class CheckpointError(ValueError):
    """A user-facing problem with a checkpoint file or its fit to the backbone."""


def backbone_header(backbone: Backbone) -> dict:
    config = backbone.config
    return {"arch": config.arch, "weights": config.weights, "weights_identity": backbone.weights_identity,
            "seed": config.seed, "image_size": backbone.image_size, "layers": list(backbone.layers),
            "vv_attention": config.vv_attention}


def save_checkpoint(path: str | Path, method: AnomalyMethod, options: dict, training: dict,
                    preset: dict | None = None) -> dict:
    """Write the method's trained tensors and header; returns the header. ``preset``: what
    ``scoring.preset.header_entry`` says of the preset it was trained from."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in method.trained_state().items()}
    options = method.checkpoint_options(options)
    header = {"format": FORMAT, "method": method.name, "method_version": method.version, "options": options,
              "backbone": backbone_header(method.backbone), "prompts": method.prompt_pack.model_dump(),
              "preset": preset, "training": training, "identity": state_digest(state)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={METADATA_KEY: json.dumps(header)})
    return header


def read_header(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # not safetensors, truncated
        raise CheckpointError(f"cannot read {path} as a safetensors checkpoint: {err}") from None
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is a safetensors file but not a linewatch checkpoint (no '{METADATA_KEY}' header)") from None
    except RecursionError:  # hostile or damaged: JSON nested beyond what the parser takes
        raise CheckpointError(f"{path}: damaged checkpoint header: its JSON is nested too deeply") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found!r}, this linewatch reads {FORMAT!r}")
    for key, kind in HEADER_FIELDS.items():
        if not isinstance(header.get(key), kind):
            raise CheckpointError(f"{path}: damaged checkpoint header: {key!r} missing or not a {kind.__name__}")
    missing = BACKBONE_FIELDS - header["backbone"].keys()
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint header: backbone lacks {', '.join(sorted(missing))}")
    method = METHODS.get(header["method"])
    trained = header.get("method_version", 1)  # checkpoints before versions were recorded: 1
    if method is not None and trained != method.version:
        raise CheckpointError(f"{path} holds a {method.name} of form v{trained}; this linewatch scores "
                              f"v{method.version} "
                              f"({method.version_note}). Retrain it: linewatch train --method {method.name} ...")
    return header


def checkpoint_backbone(path: str | Path, given: dict | None = None) -> BackboneConfig:
    """The backbone a checkpoint was trained on, against what was set explicitly (flags or
    settings, by field name). ``weights`` says where the weights live on this machine and
    ``seed`` which random weights; the load then checks they are the trained ones. Any other
    field (``arch``, ``image_size``, ``layers``, ``vv_attention``, and ``method``) must agree
    with the checkpoint or is refused with both sides named. The one policy of eval, train's
    evaluation and the pipeline."""
    header = read_header(path)
    b, given = header["backbone"], {k: v for k, v in (given or {}).items() if v is not None}
    trained = {"arch": b["arch"], "image_size": b["image_size"], "layers": tuple(b["layers"]),
               "vv_attention": b["vv_attention"], "method": header["method"]}
    clashes = [f"--{name.replace('_', '-')} {_shown(given[name])} (checkpoint: {_shown(value)})"
               for name, value in trained.items() if name in given and _shown(given[name]) != _shown(value)]
    if clashes:
        raise CheckpointError(f"checkpoint {path} was trained differently: {'; '.join(clashes)}; leave these "
                              "out (flags, or the backbone settings) to use the checkpoint's")
    return BackboneConfig(arch=b["arch"], weights=given.get("weights", b["weights"]), image_size=b["image_size"],
                          layers=tuple(b["layers"]), vv_attention=b["vv_attention"], seed=given.get("seed", b["seed"]))


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_backbone(header: dict, backbone: Backbone, path: str | Path) -> None:
    trained, here = header["backbone"], backbone_header(backbone)
    fields = {"arch": "architecture", "weights_identity": "weights", "image_size": "image size",
              "layers": "tapped layers", "vv_attention": "V-V path"}
    differences = [f"{label} {trained[key]!r} (this backbone: {here[key]!r})"
                   for key, label in fields.items() if trained[key] != here[key]]
    if differences:
        raise CheckpointError(f"checkpoint {path} was trained for another backbone: " + "; ".join(differences)
                              + f". Run it on --arch {trained['arch']} --weights {trained['weights']} "
                              f"--image-size {trained['image_size']} --layers {','.join(map(str, trained['layers']))}")


def load_checkpoint(path: str | Path, backbone: Backbone, prompts: PromptPack | None = None) -> AnomalyMethod:
    """The method of a checkpoint, built on ``backbone`` with its trained tensors loaded.
    The checkpoint's own prompt pack is used unless ``prompts`` is given."""
    from safetensors.torch import load_file

    header = read_header(path)
    check_backbone(header, backbone, path)
    pack = prompts or PromptPack.model_validate(header["prompts"])
    method = create_method(header["method"], backbone, pack, **header["options"])
    state = load_file(str(path), device=str(backbone.device))
    if state_digest(state) != header["identity"]:
        raise CheckpointError(f"{path}: tensors do not match the digest in its header (file damaged or edited)")
    try:
        method.load_trained_state(state)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    method.checkpoint = header
    return method
