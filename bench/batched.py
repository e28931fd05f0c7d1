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
from ..workers.worker import reduce_maps, to_host
from .measure import MemoryWatch, PartResult, percentiles, synchronize

PRECISION_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}  # ties go to the more exact
TIE = 0.05  # within 5 % of the fastest counts as equally fast: repeat runs on a 2-core machine vary that much
WAIT_SHARE = 0.10  # a frame waits for company at most this share of its batch's scoring time


def score_batches(method: AnomalyMethod, class_name: str, anchors: TextAnchors, jpegs: list[bytes], batch: int,
                  precision: str, part: str = "scoring", progress=None, compiled: bool = False,
                  min_seconds: float = 0.0, frame_size: tuple[int, int] = (640, 360),
                  overlap: bool | None = None) -> PartResult:
    """Decode and score ``jpegs`` in batches of ``batch`` (again, until ``min_seconds`` have passed),
    the way the worker does: scores and maps end on the host as it sends them (maps reduced
    to the wire's size for frames of ``frame_size``), and on a GPU batch k is queued before
    batch k-1's results are read (``ScoringWorker.run``). Frames/s is frames over the wall
    time of the passes; a frame's latency is its batch's, queued to results on the host. One
    untimed warm-up batch first. ``overlap`` None: as the worker decides (on CUDA)."""
    backbone = method.backbone
    decoder = FrameDecoder(backbone.image_size, backbone.device)
    method.prepare(class_name, anchors=anchors)  # once: the text side is cached
    overlap = backbone.device.type == "cuda" if overlap is None else overlap

    def launch(chunk: list[bytes]):
        began = time.perf_counter()
        images, _, failed = decoder.decode(chunk)
        if failed:
            raise ValueError(f"benchmark frames failed to decode: {sorted(failed.values())[0]}")
        result = method.score(images)
        rows, maps = reduce_maps(result.anomaly_map, [frame_size] * len(chunk))
        return began, len(chunk), to_host([result.image_score.float(), *maps])

    def land(launched, counted: bool = True) -> None:
        began, frames, (host, ready) = launched
        if ready is not None:
            ready.synchronize()
        host[0].tolist()
        for maps in host[1:]:
            maps.numpy()
        latencies.extend([time.perf_counter() - began] * frames)
        if progress is not None and counted:
            progress.update(frames)

    with backbone.computing_in(autocast_dtype(precision)):
        latencies: list[float] = []
        land(launch(jpegs[:batch]), counted=False)
        synchronize(backbone.device)
        latencies.clear()
        seconds = 0.0
        with MemoryWatch(backbone.device) as memory:
            while seconds == 0.0 or seconds < min_seconds:
                began, pending = time.perf_counter(), None
                for start in range(0, len(jpegs), batch):
                    launched = launch(jpegs[start:start + batch])
                    if pending is not None:
                        land(pending)
                    pending = launched
                    if not overlap:
                        land(pending)
                        pending = None
                if pending is not None:
                    land(pending)
                seconds += time.perf_counter() - began
    return PartResult(part, len(latencies), seconds, percentiles(latencies), "its batch, queued to results on the host",
                      memory.rss_mb, memory.gpu_mb, memory.other_cpu,
                      settings={"batch": batch, "precision": precision, "preprocess": decoder.where,
                                "anchors": "built once", "autograd": "inference_mode", "compiled": compiled,
                                "one_batch_in_flight": overlap})


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
    batch_ms = 1000.0 * chosen.settings["batch"] / chosen.fps  # a batch's share of the time (with one in
    # flight on a GPU, a frame's latency also holds the batch ahead of it)
    wait = float(max(1, round(WAIT_SHARE * batch_ms)))
    why = (f"{chosen.fps:.2f} frames/s, the fastest within {TIE:.0%} of the best ({best:.2f}); "
           f"wait {WAIT_SHARE:.0%} of its {batch_ms:.0f} ms batch")
    return WorkerPick(chosen.settings["batch"], chosen.settings["precision"], wait, chosen.settings["compiled"], why)
