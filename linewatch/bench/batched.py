"""linewatch's scoring path, measured alone: the worker's decoder and batches, anchors
built once, inference mode, the image tower in the chosen precision; and the sweep over
batch sizes and precisions that picks the worker's settings."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..scoring.methods import AnomalyMethod
from ..scoring.precision import autocast_dtype
from ..scoring.prompts import TextAnchors
from ..workers.frames import FrameDecoder
from ..workers.worker import wire_maps
from .measure import MemoryWatch, PartResult, percentiles, synchronize

PRECISION_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}  # ties go to the more exact
TIE = 0.05  # within 5 % of the fastest counts as equally fast: repeat runs on a 2-core machine vary that much
WAIT_SHARE = 0.10  # a frame waits for company at most this share of its batch's scoring time


def score_batches(method: AnomalyMethod, class_name: str, anchors: TextAnchors, jpegs: list[bytes], batch: int,
                  precision: str, part: str = "scoring", progress=None, compiled: bool = False,
                  min_seconds: float = 0.0, frame_size: tuple[int, int] = (640, 360)) -> PartResult:
    """Decode and score ``jpegs`` in batches of ``batch`` (again, until ``min_seconds`` have passed);
    each frame's latency is its batch's time (a frame's score is ready when its batch is). One
    untimed warm-up batch first. Scores and maps end on the host as the worker sends them
    (maps reduced to the wire's size for frames of ``frame_size``)."""
    backbone = method.backbone
    decoder = FrameDecoder(backbone.image_size, backbone.device)
    method.prepare(class_name, anchors=anchors)  # once: the text side is cached

    def run(chunk: list[bytes]) -> None:
        images, _, failed = decoder.decode(chunk)
        if failed:
            raise ValueError(f"benchmark frames failed to decode: {sorted(failed.values())[0]}")
        result = method.score(images)
        result.image_score.float().cpu().tolist()
        wire_maps(result.anomaly_map, [frame_size] * len(chunk))  # as the worker sends them

    with backbone.computing_in(autocast_dtype(precision)):
        run(jpegs[:batch])
        synchronize(backbone.device)
        latencies, batch_times = [], []
        with MemoryWatch(backbone.device) as memory:
            while not batch_times or sum(batch_times) < min_seconds:
                for start in range(0, len(jpegs), batch):
                    chunk = jpegs[start:start + batch]
                    began = time.perf_counter()
                    run(chunk)
                    synchronize(backbone.device)
                    batch_times.append(time.perf_counter() - began)
                    latencies += [batch_times[-1]] * len(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
    return PartResult(part, len(latencies), sum(batch_times), percentiles(latencies), "its batch, decode to scores on the host",
                      memory.rss_mb, memory.gpu_mb, memory.other_cpu,
                      settings={"batch": batch, "precision": precision, "preprocess": decoder.where,
                                "anchors": "built once", "autograd": "inference_mode", "compiled": compiled})


@dataclass
class WorkerPick:
    max_batch: int
    precision: str
    max_wait_ms: float
    compiled: bool
    why: str

    def to_json(self) -> dict:
        return {"max_batch": self.max_batch, "precision": self.precision, "max_wait_ms": self.max_wait_ms,
                "compile": self.compiled, "why": self.why}


def pick_settings(sweep: list[PartResult]) -> WorkerPick:
    """The fastest configuration; among those within 5 % of it the smaller batch (less latency),
    then the more exact precision, then uncompiled. The batch may wait for more frames
    ``WAIT_SHARE`` of its own scoring time: at most 10 % added latency when frames are
    scarce, and when they are plentiful the batch fills before the wait ends."""
    best = max(r.fps for r in sweep)
    close = [r for r in sweep if r.fps >= best * (1 - TIE)]
    chosen = min(close, key=lambda r: (r.settings["batch"], PRECISION_ORDER[r.settings["precision"]],
                                       r.settings["compiled"]))
    batch_ms = chosen.latency_ms["p50"]
    wait = float(max(1, round(WAIT_SHARE * batch_ms)))
    why = (f"{chosen.fps:.2f} frames/s, the fastest within {TIE:.0%} of the best ({best:.2f}); "
           f"wait {WAIT_SHARE:.0%} of its {batch_ms:.0f} ms batch")
    return WorkerPick(chosen.settings["batch"], chosen.settings["precision"], wait, chosen.settings["compiled"], why)
