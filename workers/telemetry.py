"""What a scoring worker tells its operators once per loop turn: the liveness heartbeat,
readiness (the group's assignment), the consumer-lag gauge and, every ``summary_s``, one log
line with frames/s, lag, mean batch and latency percentiles (from the first batch on: before
it, a worker has no figures to give). The per-frame and per-batch
metrics are counted where they happen, in ``worker.py``."""

from __future__ import annotations

import logging
import time

import numpy as np

from ..bus import Consumer
from ..ops import metrics
from ..ops.health import HEALTH, Health

log = logging.getLogger("linewatch.workers.worker")

# The lag gauge (``bus.records_behind`` per partition, as the summary line and the console count
# it) is refreshed this often, after a poll; cheap (kafka-python reads it from fetch responses).
# At 5 s it read 0 for seconds while ingest had published a whole clip ahead of the first batch.
LAG_EVERY_S = 1.0
# Until its first batch is done a worker may wait minutes inside it (torch.compile, cuDNN
# autotuning, lazy CUDA init): liveness allows this much then, so a slow start never crash-loops.
FIRST_BATCH_GRACE_S = 900.0


class WorkerTelemetry:
    def __init__(self, worker, health: Health = HEALTH, summary_s: float = 0.0, loop: str = "worker"):
        self.worker, self.health, self.summary_s, self.loop = worker, health, summary_s, loop
        self.assigned: bool | None = None
        self.lag: dict[tuple[str, int], int] | None = None
        self._lag_series: set[tuple[str, str, str]] = set()
        self._next_lag = 0.0
        self.lag_every_s = LAG_EVERY_S
        self._last = (time.monotonic(), 0, 0, 0)  # time, frames, batches, dead at the last summary
        device = worker.backbone.device
        if device.type == "cuda":
            metrics.watch_gpu(device)

    def tick(self, consumer: Consumer) -> None:
        """Once per loop turn (after each poll)."""
        first = self.worker.stats.batches == 0
        self.health.beat(self.loop, max(self.health.bound_s, FIRST_BATCH_GRACE_S) if first else None)
        assigned = consumer.assigned()
        if assigned != self.assigned:
            self.assigned = assigned
            self.health.set("assignment", assigned, "partitions assigned by the group" if assigned
                            else "waiting for the group to assign partitions")
        now = time.monotonic()
        if first:  # no figures before the first batch: the first summary's window starts with the frames
            stats = self.worker.stats
            self._last = (now, stats.frames, stats.batches, stats.dead)
        summary_due = self.summary_s and now - self._last[0] >= self.summary_s
        if now >= self._next_lag or summary_due:
            self._next_lag = now + self.lag_every_s
            self._update_lag(consumer)
        if summary_due:
            self.summarise(now)

    def stopped(self) -> None:
        self.health.stop_beating(self.loop)

    def _update_lag(self, consumer: Consumer) -> None:
        self.lag = consumer.lag()
        series = {(self.worker.group, topic, str(partition)): lag for (topic, partition), lag in (self.lag or {}).items()}
        for gone in self._lag_series - set(series):  # partitions moved to another member
            metrics.CONSUMER_LAG.remove(*gone)
        for labels, lag in series.items():
            metrics.CONSUMER_LAG.labels(*labels).set(lag)
        self._lag_series = set(series)

    def summarise(self, now: float | None = None) -> str:
        """Log (and return) the one-line summary of the time since the last one."""
        now = time.monotonic() if now is None else now
        stats = self.worker.stats
        since, frames, batches, dead = self._last
        window = max(now - since, 1e-9)
        new_frames, new_batches = stats.frames - frames, stats.batches - batches
        recent = list(stats.end_to_end_s)[-new_frames:] if new_frames else []
        p50, p99 = (float(np.percentile(recent, q)) * 1000 for q in (50, 99)) if recent else (None, None)
        lag = sum(self.lag.values()) if self.lag else None
        figures = {"frames_per_s": round(new_frames / window, 2), "lag": lag,
                   "batch": round(new_frames / new_batches, 1) if new_batches else None,
                   "p50_ms": None if p50 is None else round(p50, 1), "p99_ms": None if p99 is None else round(p99, 1),
                   "dead_letters": stats.dead - dead, "window_s": round(window, 1)}
        text = (f"{figures['frames_per_s']:.2f} frames/s, lag {'?' if lag is None else lag}, "
                f"batch {figures['batch'] if new_batches else '-'}, latency p50 "
                f"{'-' if p50 is None else f'{p50:.0f} ms'} p99 {'-' if p99 is None else f'{p99:.0f} ms'} "
                f"(published -> scored), {figures['dead_letters']} dead letters in the last {window:.0f} s")
        log.info("worker %s: %s", self.worker.worker_id, text, extra={"summary": figures})
        self._last = (now, stats.frames, stats.batches, stats.dead)
        return text
