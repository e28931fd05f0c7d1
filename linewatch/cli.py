"""The `linewatch` command. User mistakes end with one clear line, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from . import commands as pipeline_commands
from .bench import command as bench_command


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block numbers like 6,12,18,24, got {text!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def resolve_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but this torch build sees no CUDA GPU")
    return name


def check_output_path(path: str | None) -> None:
    """Fail before a long run, not after it, when the report cannot be written."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path} is a directory; give a file name")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--json {path}: cannot write under {parent}")


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--arch", default=None, help="open_clip architecture (default: ViT-B-16, or the checkpoint's)")
    group.add_argument("--weights", default=None,
                       help="'none' (random, seeded), an open_clip pretrained tag such as 'openai', "
                            "or a local .safetensors/.pt file (default: none, or the checkpoint's)")
    group.add_argument("--image-size", type=_positive, default=None, help="input size in px (default: the architecture's)")
    group.add_argument("--layers", type=_layers, default=None, help="ViT blocks to tap, e.g. 6,12,18,24 (default: four evenly spaced)")
    group.add_argument("--vv-attention", action="store_true", help="V-V attention local path for patch embeddings (CLIP-VV)")
    group.add_argument("--seed", type=int, default=0, help="seed for random weights and few-shot sampling")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linewatch", description=__doc__)
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    ev = commands.add_parser("eval", help="evaluate a method on MVTec-layout data",
                             description="Score every test image of one category (or a folder of categories) "
                                         "and print image and pixel AUROC, AP, F1-max and AUPRO.")
    ev.add_argument("--method", default=None, help="scoring method (see `linewatch methods`; default winclip)")
    ev.add_argument("--checkpoint", default=None, help="a trained checkpoint from `linewatch train` (sets method and backbone)")
    ev.add_argument("--data", required=True, help="a category folder or a folder of categories in MVTec layout")
    ev.add_argument("--shots", type=int, default=0, help="normal reference images from train/good (0: zero-shot)")
    ev.add_argument("--prompts", default=None, help="prompt pack YAML (default: the bundled pack)")
    ev.add_argument("--option", dest="options", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="method option, repeatable, e.g. text_weight=0 (see each method's docstring)")
    ev.add_argument("--batch-size", type=_positive, default=8)
    ev.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    add_backbone_arguments(ev)

    tr = commands.add_parser("train", help="few-shot training of a method, saved as a checkpoint",
                             description="Train a method's adapters/prompts/projections on k normal and k anomalous "
                                         "images (with masks) per category of MVTec-layout data; the backbone stays frozen.")
    tr.add_argument("--method", required=True, help="aprilgan, aa-clip or madclip")
    tr.add_argument("--data", required=True, help="a category folder or a folder of categories in MVTec layout")
    tr.add_argument("--shots", type=_positive, default=4, help="normal and anomalous images per category (default 4)")
    tr.add_argument("--epochs", type=_positive, default=30, help="epochs per training stage (default 30)")
    tr.add_argument("--lr", type=float, default=None,
                    help="learning rate for every stage (default: the paper's per stage; AA-CLIP 1e-5 text, 5e-4 image; others 1e-3)")
    tr.add_argument("--batch-size", type=_positive, default=8)
    tr.add_argument("--views", type=_positive, default=4, help="augmented views per image (default 4)")
    tr.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    tr.add_argument("--eval", dest="eval_data", default=None,
                    help="evaluate right after training on this data (same dataset: the training images are left out; "
                         "another dataset: the cross-dataset protocol)")
    tr.add_argument("--json", dest="json_out", default=None, help="with --eval, also write the report as JSON here")
    tr.add_argument("--prompts", default=None, help="prompt pack YAML (default: the bundled pack)")
    tr.add_argument("--option", dest="options", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="method option, repeatable (see each method's docstring)")
    add_backbone_arguments(tr)

    commands.add_parser("methods", help="list the registered scoring methods")
    pipeline_commands.build(commands)
    bench_command.add_parser(commands)
    return parser


def backbone_config(args: argparse.Namespace):
    from .scoring.backbone import BackboneConfig

    return BackboneConfig(arch=args.arch or "ViT-B-16", weights=args.weights or "none", image_size=args.image_size,
                          layers=args.layers, vv_attention=args.vv_attention, seed=args.seed)


def checkpoint_backbone(args: argparse.Namespace, path: str):
    """The checkpoint's backbone; --weights may say where its weights file lives now. Other
    backbone flags must agree with it (or be left out)."""
    from .scoring.checkpoint import backbone_config as trained_backbone, read_header

    header = read_header(path)
    config = trained_backbone(header, args.weights)
    given = {"--arch": (args.arch, config.arch), "--image-size": (args.image_size, config.image_size),
             "--layers": (args.layers, config.layers), "--method": (getattr(args, "method", None), header["method"])}
    clashes = [f"{flag} {value} (checkpoint: {trained})" for flag, (value, trained) in given.items()
               if value is not None and tuple(value if isinstance(value, tuple) else [value]) != tuple(
                   trained if isinstance(trained, tuple) else [trained])]
    if clashes or (args.vv_attention and not config.vv_attention):
        raise ValueError(f"checkpoint {path} was trained differently: {'; '.join(clashes) or '--vv-attention'}; "
                         "leave these flags out to use the checkpoint's")
    return config


def run_eval(args: argparse.Namespace) -> None:
    from .evaluate import EvalConfig, evaluate, format_table, write_json

    if args.shots < 0:
        raise ValueError("--shots must be 0 or more")
    check_output_path(args.json_out)
    backbone = checkpoint_backbone(args, args.checkpoint) if args.checkpoint else backbone_config(args)
    config = EvalConfig(
        method=args.method or "winclip", data=args.data, shots=args.shots, prompts=args.prompts, options=dict(args.options),
        batch_size=args.batch_size, seed=args.seed, device=resolve_device(args.device), backbone=backbone,
        checkpoint=args.checkpoint)
    if args.checkpoint and args.options:
        raise ValueError("--option cannot change a checkpoint's method options; they are fixed at training")
    report = evaluate(config)
    print(format_table(report))
    if args.json_out:
        write_json(report, args.json_out)
        print(f"report written to {args.json_out}")


def run_train(args: argparse.Namespace) -> None:
    from .evaluate import EvalConfig, evaluate, format_table, write_json
    from .scoring.training import TrainConfig
    from .train import TrainJob, run_training

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: checkpoints are safetensors files; name it *.safetensors")
    check_output_path(args.out)
    check_output_path(args.json_out)
    if args.eval_data:
        from .datasets import find_categories

        find_categories(args.eval_data)  # a wrong path fails now, not after training
    job = TrainJob(method=args.method, data=args.data, out=args.out, shots=args.shots, prompts=args.prompts,
                   options=dict(args.options), device=resolve_device(args.device), backbone=backbone_config(args),
                   train=TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, views=args.views,
                                     seed=args.seed))
    method, _ = run_training(job)
    if args.eval_data:
        config = EvalConfig(method=args.method, data=args.eval_data, batch_size=args.batch_size, seed=args.seed,
                            device=job.device, backbone=job.backbone, checkpoint=args.out)
        report = evaluate(config, method=method)
        print(format_table(report))
        if args.json_out:
            write_json(report, args.json_out)
            print(f"report written to {args.json_out}")


def run_methods(_: argparse.Namespace) -> None:
    from .scoring.methods import METHODS

    for name, cls in sorted(METHODS.items()):
        print(f"{name:<12}{(cls.__doc__ or '').strip()}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"eval": run_eval, "train": run_train, "methods": run_methods, "bench": bench_command.run,
                **pipeline_commands.HANDLERS}
    from .bus import BusError
    from .datasets import DatasetError
    from .scoring.backbone import BackboneError

    try:
        handlers[args.command](args)
    except (BackboneError, DatasetError, BusError, ValueError, OSError) as err:  # OSError: paths, permissions
        print(f"linewatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("linewatch: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
