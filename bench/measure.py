"""What every benchmark part reports: frames, seconds, frames/s, per-frame latency
percentiles and peak memory, plus the settings it ran with."""

from __future__ import annotations

import math
import os
import resource
import threading
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class PartResult:
    part: str  # naive, scoring, sweep, embedded, kafka, opencv-decode, ingest
    frames: int
    seconds: float  # the part's timed span (warm-up excluded)
    latency_ms: dict  # {"p50": .., "p99": ..} per frame (what "latency" means is in `latency_is`)
    latency_is: str
    peak_rss_mb: float | None  # the process's resident memory at its highest during the part
    peak_gpu_mb: float | None  # torch.cuda.max_memory_allocated during the part (GPU only)
    # share of the machine's CPU time other processes used during the part (a broker this run
    # started counts as other): above a few percent, the part's figures are not this code's alone
    other_cpu: float | None = None
    settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["fps"] = self.fps
        return out


def percentiles(samples_s: list[float]) -> dict:
    """p50 and p99 in milliseconds, nearest-rank (no interpolation between two frames' figures)."""
    if not samples_s:
        return {"p50": None, "p99": None}
    ordered = sorted(samples_s)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000.0

    return {"p50": rank(0.50), "p99": rank(0.99)}


def _machine_busy_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return (total - idle) / tick, total / tick


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        return None


class MemoryWatch:
    """Peak resident memory while the block runs: a sampler thread reads /proc every 100 ms
    (ru_maxrss only ever grows over the process's life, so it cannot tell parts apart; it
    stands in where /proc is missing). On CUDA also the peak of allocated tensors. And the
    CPU other processes took meanwhile: on a shared machine that is what invalidates a figure."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.1):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_rss: int | None = None
        self.peak_gpu: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)
        self.other_cpu: float | None = None
        self._cpu_start: tuple | None = None

    def _sample(self) -> None:
        while True:
            now = _rss_bytes()
            if now is not None:
                self.peak_rss = max(self.peak_rss or 0, now)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "MemoryWatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._cpu_start = (_machine_busy_s(), _own_cpu_s())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        machine_start, own_start = self._cpu_start
        machine_end = _machine_busy_s()
        if machine_start is not None and machine_end is not None and machine_end[1] > machine_start[1]:
            other = (machine_end[0] - machine_start[0]) - (_own_cpu_s() - own_start)
            self.other_cpu = max(0.0, other / (machine_end[1] - machine_start[1]))
        if self.peak_rss is None:
            self.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gpu = torch.cuda.max_memory_allocated(self.device)

    @property
    def rss_mb(self) -> float | None:
        return None if self.peak_rss is None else self.peak_rss / 2**20

    @property
    def gpu_mb(self) -> float | None:
        return None if self.peak_gpu is None else self.peak_gpu / 2**20


def process_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops when the work is done, not when it was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
