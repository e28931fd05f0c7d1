"""Argument types and the flag groups several commands share, each defined once.

Settings flags write into a dotted destination (``dest="worker.max_batch"``) and are absent
unless given (``default=SUPPRESS``), so a flag overrides LINEWATCH_* variables, which override
the --config file, and a checkpoint's backbone is only checked against what was really given.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from pathlib import Path

S = argparse.SUPPRESS
BACKBONE_FIELDS = ("arch", "weights", "image_size", "layers", "vv_attention", "seed", "device")


def layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 6,12,18,24, got {text!r}") from None


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key.strip()}: cannot read {value!r} as a value") from None


def port(text: str) -> int | None:
    """A TCP port, 0 for any free one, or 'off'."""
    if text.lower() in ("off", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, 0 (any free port) or 'off', got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535")
    return value


def threshold(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def when(text: str) -> float:
    """UNIX seconds, or an ISO 8601 time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected UNIX seconds or an ISO time like 2026-11-23T10:00:00, "
                                         f"got {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def add_backbone(parser: argparse.ArgumentParser) -> None:
    """The backbone flags of every command that builds a model (eval, train, bench, run,
    worker, replay): one definition, so they cannot drift apart."""
    group = parser.add_argument_group("backbone")
    group.add_argument("--arch", dest="backbone.arch", default=S,
                       help="open_clip architecture (default: ViT-B-16, or the checkpoint's or train preset's); "
                            "linewatch-tiny is a 64 px, 4-block test architecture: with --weights none it runs "
                            "in seconds on a CPU, for trying commands and for the tests, not for detection")
    group.add_argument("--weights", dest="backbone.weights", default=S,
                       help="'none' (random, seeded), an open_clip pretrained tag such as 'openai' (downloaded once "
                            "into the Hugging Face cache; a tag not cached is refused at once when the hub cannot be "
                            "reached), or a local .safetensors/.pt file (default: none, or the checkpoint's or train preset's)")
    group.add_argument("--image-size", dest="backbone.image_size", type=positive, default=S,
                       help="input size in px (default: the architecture's, or the checkpoint's or train preset's)")
    group.add_argument("--layers", dest="backbone.layers", type=layers, default=S,
                       help="ViT blocks to tap, e.g. 6,12,18,24 (default: four evenly spaced, or the checkpoint's "
                            "or train preset's)")
    group.add_argument("--vv-attention", dest="backbone.vv_attention", action=argparse.BooleanOptionalAction,
                       default=S, help="V-V attention local path for patch embeddings (CLIP-VV; default: off, "
                                       "or the checkpoint's or train preset's)")
    group.add_argument("--seed", dest="backbone.seed", type=int, default=S,
                       help="seed for random weights (and few-shot sampling in eval/train; default 0)")
    group.add_argument("--device", dest="backbone.device", default=S,
                       help="torch device (default: cuda if available, else cpu)")


def given_backbone(args: argparse.Namespace) -> dict:
    """The backbone flags given on the command line, by field name."""
    return {name: getattr(args, f"backbone.{name}") for name in BACKBONE_FIELDS if hasattr(args, f"backbone.{name}")}


def check_output_path(path: str | None, flag: str = "--json") -> None:
    """Fail before a long run, not after it, when the output cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write under {parent}")


def metavars(parser: argparse.ArgumentParser) -> None:
    """``--max-batch MAX_BATCH``, not ``WORKER.MAX_BATCH``."""
    for action in parser._actions:
        if "." in action.dest and action.metavar is None and action.nargs != 0:
            action.metavar = action.dest.rsplit(".", 1)[1].upper()
