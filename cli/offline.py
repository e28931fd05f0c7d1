"""``linewatch eval``, ``train`` and ``methods``: work on datasets, outside the pipeline."""

from __future__ import annotations

import argparse
import json

from ..scoring.options import canonical_method
from . import args as a


def add_parsers(commands) -> None:
    ev = commands.add_parser("eval", help="evaluate a method on MVTec-layout data",
                             description="Score every test image of one category (or a folder of categories) "
                                         "and print image and pixel AUROC, AP, F1-max and AUPRO.")
    ev.add_argument("--method", default=None, type=canonical_method,
                    help="scoring method (see `linewatch methods`; default aprilgan, as in run and worker)")
    ev.add_argument("--checkpoint", default=None, help="a trained checkpoint from `linewatch train` (sets method and backbone)")
    ev.add_argument("--data", required=True, help="a category folder or a folder of categories in MVTec layout")
    ev.add_argument("--shots", type=int, default=0, help="normal reference images from train/good (0: zero-shot)")
    ev.add_argument("--prompts", default=None, help="prompt pack YAML (default: the bundled pack)")
    ev.add_argument("--option", dest="options", type=a.option, action="append", default=[], metavar="KEY=VALUE",
                    help="method option, repeatable, e.g. text_weight=0 (linewatch methods NAME lists them)")
    ev.add_argument("--batch-size", type=a.positive, default=8,
                    help="test images scored together (default 8); more is faster and takes more memory")
    ev.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    a.add_backbone(ev)
    a.metavars(ev)

    tr = commands.add_parser("train", help="few-shot training of a method, saved as a checkpoint",
                             description="Train a method's adapters/prompts/projections on k normal and k anomalous "
                                         "images (with masks) per category of MVTec-layout data; the backbone stays "
                                         "frozen. Settings come from a preset (--preset, default cpu); flags given "
                                         "explicitly override the preset's values, and another --arch also drops the "
                                         "preset's weights, image size and layers for that architecture's defaults "
                                         "(see `linewatch methods --presets`).")
    tr.add_argument("--method", default=None, type=canonical_method,
                    help="a method with trained parts (`linewatch methods` lists them); may be left out when "
                         "--preset is a file naming it")
    tr.add_argument("--preset", default=None, metavar="paper|cpu|FILE",
                    help="settings: 'cpu' (default: ViT-B-16 at 224 px, a schedule that trains in minutes on a CPU), "
                         "'paper' (the paper's backbone, image size, layers, schedule and choices; needs its "
                         "pretrained weights and a GPU), or a preset JSON file; explicit flags win over it")
    tr.add_argument("--data", required=True, help="a category folder or a folder of categories in MVTec layout")
    tr.add_argument("--shots", type=a.positive, default=None,
                    help="normal and anomalous images per category (default: the preset's, else 4)")
    tr.add_argument("--epochs", type=a.positive, default=None,
                    help="epochs of every training stage (default: the preset's)")
    tr.add_argument("--lr", type=float, default=None,
                    help="learning rate of every stage (default: the preset's per stage)")
    tr.add_argument("--batch-size", type=a.positive, default=None,
                    help="batch size of every stage (default: the preset's)")
    tr.add_argument("--views", type=a.positive, default=None, help="augmented views per image (default: the preset's)")
    tr.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    tr.add_argument("--eval", dest="eval_data", default=None,
                    help="evaluate right after training on this data: the same dataset (the training images are "
                         "left out), or another one: the cross-dataset protocol of AA-CLIP and APRIL-GAN (train on an "
                         "auxiliary dataset, test zero-shot on another)")
    tr.add_argument("--eval-shots", type=int, default=None, metavar="N",
                    help="with --eval: normal reference images per category (from train/good) the evaluation gives "
                         "the trained method, as `linewatch run --references` would (default: the training's shots "
                         "when the method keeps a memory bank, else 0; 0: zero-shot, the cross-dataset papers' "
                         "protocol)")
    tr.add_argument("--json", dest="json_out", default=None, help="with --eval, also write the report as JSON here")
    tr.add_argument("--prompts", default=None, help="prompt pack YAML (default: the bundled pack)")
    tr.add_argument("--option", dest="options", type=a.option, action="append", default=[], metavar="KEY=VALUE",
                    help="method option, repeatable, on top of the preset's (linewatch methods NAME lists them)")
    a.add_backbone(tr)
    a.metavars(tr)

    methods = commands.add_parser("methods", help="list the registered scoring methods",
                                  description="List every scoring method linewatch has, with one line on what it is; --method NAME picks one in eval, train, run, worker and replay.")
    methods.add_argument("name", nargs="?", default=None, metavar="NAME",
                         help="one method: what it is, its options (rule, default, meaning), stages and presets")
    methods.add_argument("--presets", action="store_true", help="also list each method's training presets")


def _backbone(args: argparse.Namespace):
    from ..scoring.backbone import BackboneConfig

    given = a.given_backbone(args)
    given.pop("device", None)
    return BackboneConfig(**given)


def _seed(args: argparse.Namespace) -> int:
    return getattr(args, "backbone.seed", 0)


def _device(args: argparse.Namespace) -> str:
    from ..scoring.precision import resolve_device

    return resolve_device(getattr(args, "backbone.device", None))


def run_eval(args: argparse.Namespace) -> None:
    from ..scoring.options import DEFAULT_METHOD, check_options
    from ..scoring.weights import check_weights

    if args.shots < 0:
        raise ValueError("--shots must be 0 or more")
    a.check_output_path(args.json_out)
    if not args.checkpoint:  # before torch is imported: a mistake fails in a second
        check_options(args.method or DEFAULT_METHOD, dict(args.options))
    check_weights(getattr(args, "backbone.arch", "ViT-B-16"), getattr(args, "backbone.weights", "none"))
    from ..offline.evaluate import EvalConfig, evaluate, format_table, write_json
    from ..scoring.checkpoint import checkpoint_backbone

    if args.checkpoint:
        given = {k: v for k, v in a.given_backbone(args).items() if k not in ("seed", "device")}
        backbone = checkpoint_backbone(args.checkpoint, {**given, "method": args.method})
    else:
        backbone = _backbone(args)
    if args.checkpoint and args.options:
        raise ValueError("--option cannot change a checkpoint's method options; they are fixed at training")
    config = EvalConfig(
        method=args.method or DEFAULT_METHOD, data=args.data, shots=args.shots, prompts=args.prompts, options=dict(args.options),
        batch_size=args.batch_size, seed=_seed(args), device=_device(args), backbone=backbone,
        checkpoint=args.checkpoint)
    report = evaluate(config)
    print(format_table(report))
    if args.json_out:
        write_json(report, args.json_out)
        print(f"report written to {args.json_out}")


def run_train(args: argparse.Namespace) -> None:
    from ..offline.evaluate import EvalConfig, evaluate, format_table, write_json
    from ..offline.fewshot import TrainJob, check_trainable, run_training
    from ..scoring.preset import DEFAULT_PRESET, DEFAULT_SHOTS, backbone_config, header_entry, load_preset, train_config

    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: checkpoints are safetensors files; name it *.safetensors")
    a.check_output_path(args.out, "--out")
    a.check_output_path(args.json_out)
    if args.eval_shots is not None and (args.eval_shots < 0 or not args.eval_data):
        raise ValueError("--eval-shots takes a number >= 0, with --eval DATA")
    if args.method is None and not (args.preset and args.preset.endswith(".json")):
        raise ValueError("--method is required (unless --preset is a preset file that names it)")
    if args.method is not None:
        check_trainable(args.method)  # before its presets are looked for
    preset, path = load_preset(args.method, args.preset or DEFAULT_PRESET)
    given = a.given_backbone(args)
    given.pop("device", None)
    job = TrainJob(method=preset.method, data=args.data, out=args.out, shots=args.shots or preset.training.shots
                   or DEFAULT_SHOTS, prompts=args.prompts, options={**preset.options, **dict(args.options)},
                   device=_device(args), backbone=backbone_config(preset, given),
                   train=train_config(preset, seed=_seed(args), epochs=args.epochs, lr=args.lr,
                                      batch_size=args.batch_size, views=args.views),
                   preset=header_entry(preset, path))
    eval_shots = _eval_shots(args, job) if args.eval_data else 0  # a wrong --eval fails now, not after training
    method, _ = run_training(job)
    if args.eval_data:
        config = EvalConfig(method=job.method, data=args.eval_data, shots=eval_shots, batch_size=8, seed=_seed(args),
                            device=job.device, backbone=job.backbone, checkpoint=args.out)
        report = evaluate(config, method=method)
        report["shots_from"] = _shots_from(args, job, eval_shots)
        print(format_table(report))
        if args.json_out:
            write_json(report, args.json_out)
            print(f"report written to {args.json_out}")


def _eval_shots(args: argparse.Namespace, job) -> int:
    """How many normal references per category train --eval gives the method: as it would run."""
    from ..offline.datasets import DatasetError, find_categories

    memory = job.options.get("memory_bank", True)
    shots = args.eval_shots if args.eval_shots is not None else (job.shots if memory else 0)
    if shots and not memory:
        raise ValueError(f"--eval-shots {shots}: {job.method} is trained without a memory bank (memory_bank=false), "
                         "so it takes no references; leave --eval-shots out (zero-shot)")
    for category in find_categories(args.eval_data):
        if shots > len(category.train_good):
            raise DatasetError(f"--eval {args.eval_data}: {category.name} has {len(category.train_good)} images in "
                               f"train/good, fewer than the {shots} references to evaluate with; pass --eval-shots")
    return shots


def _shots_from(args: argparse.Namespace, job, shots: int) -> str:
    if args.eval_shots is not None:
        return "--eval-shots"
    if shots:
        return f"the training's shots as references from train/good, as run --references; --eval-shots 0: zero-shot"
    return "no memory bank: zero-shot, as it runs"


def run_methods(args: argparse.Namespace) -> None:
    from ..scoring import plugins
    from ..scoring.methods import METHODS, method_class

    if args.name is not None:
        return describe_method(method_class(args.name))
    for name in sorted({*METHODS, *plugins.names()}):
        builtin = name in METHODS
        try:
            cls = method_class(name)
        except ValueError as err:  # a package's method that cannot be imported: listed, with why
            print(f"{name:<12}(from {plugins.origin(name)}) unusable: {err}")
            continue
        origin = "" if builtin else f" (from {plugins.origin(name)})"
        print(f"{name:<12}{(cls.__doc__ or '').strip()}{origin}")
        if args.presets:
            from ..scoring.preset import bundled, describe, load_preset

            for preset_name in bundled(name).get(name, []):
                preset, _ = load_preset(name, preset_name)
                print(f"  --preset {preset_name:<6} {preset.description}\n{'':<19}{describe(preset)}")


def describe_method(cls) -> None:
    """``linewatch methods NAME``: the method's line, its options as its ``Options`` model
    declares them, what it trains and its presets."""
    from ..scoring import plugins
    from ..scoring.preset import bundled, describe, load_preset

    origin = f" (from {plugins.origin(cls.name)})" if cls.name in plugins.names() else ""
    print(f"{cls.name}: {(cls.__doc__ or '').strip()}{origin}")
    print("\noptions (--option KEY=VALUE, or a profile's options):")
    for key, field in cls.Options.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        rule = extra.get("accepts") or getattr(field.annotation, "__name__", str(field.annotation))
        default = "null" if field.default is None else json.dumps(field.default, default=list)
        print(f"  {key:<18}{rule}; default {default}")
        if field.description:
            print(f"  {'':<18}{field.description}")
    stages = ", ".join(cls.stages) or "nothing (training-free)"
    print(f"\ntrains: {stages}")
    presets = bundled(cls.name).get(cls.name, [])
    for preset_name in presets:
        preset, _ = load_preset(cls.name, preset_name)
        print(f"  --preset {preset_name:<6} {preset.description}\n{'':<11}{describe(preset)}")


HANDLERS = {"eval": run_eval, "train": run_train, "methods": run_methods}
