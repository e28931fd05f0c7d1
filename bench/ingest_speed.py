"""Ingest against bare OpenCV decoding of the same file: what the JPEG encoding, the frame
metadata and publishing cost on top of reading the video.

The clip is short, so each side reads it again until ``min_seconds`` have passed. Ingest
publishes onto an in-process bus that no one reads (it keeps only its newest records), so
the figure is ingest's own, not a consumer's pace."""

from __future__ import annotations

import time
from pathlib import Path

import cv2

from ..bus import Topics
from ..bus.memory import MemoryBus
from ..ingest.publisher import Ingestor
from ..ingest.sources import open_source
from .measure import MemoryWatch, PartResult, percentiles
from .workload import JPEG_QUALITY, MAX_SIZE


def opencv_decode(video: Path, min_seconds: float = 2.0) -> PartResult:
    latencies: list[float] = []
    with MemoryWatch("cpu") as memory:
        while sum(latencies) < min_seconds:
            began = time.perf_counter()  # opening the file counts, as it does for ingest
            capture = cv2.VideoCapture(str(video))
            try:
                while True:
                    ok, _ = capture.read()
                    if not ok:
                        break
                    now = time.perf_counter()
                    latencies.append(now - began)
                    began = now
            finally:
                capture.release()
            if not latencies:
                raise ValueError(f"OpenCV cannot read {video}")
    return PartResult("opencv-decode", len(latencies), sum(latencies), percentiles(latencies), "one frame read",
                      memory.rss_mb, None, memory.other_cpu, settings={"what": "cv2.VideoCapture.read"})


def ingest(video: Path, min_seconds: float = 2.0) -> PartResult:
    latencies: list[float] = []
    passes = 0
    with MemoryWatch("cpu") as memory:
        while sum(latencies) < min_seconds:
            bus = MemoryBus(Topics("bench"), partitions=1)
            last = time.perf_counter()  # opening reads the first frame: it counts
            ingestor = Ingestor(open_source(str(video), max_size=MAX_SIZE), bus, stream="bench",
                                jpeg_quality=JPEG_QUALITY)
            published = 0

            def on_frame(stats) -> None:  # called after each publish: the gaps are per-frame times
                nonlocal last, published
                if stats.published > published:
                    now = time.perf_counter()
                    latencies.append(now - last)
                    last, published = now, stats.published

            ingestor.run(on_frame)
            passes += 1
    return PartResult("ingest", len(latencies), sum(latencies), percentiles(latencies),
                      "one frame decoded, resized if over the size cap, JPEG-encoded and published",
                      memory.rss_mb, None, memory.other_cpu, settings={"max_size": MAX_SIZE, "jpeg_quality": JPEG_QUALITY,
                                                     "bus": "memory, no consumer"},
                      extra={"passes": passes})
