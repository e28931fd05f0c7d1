"""The metrics every linewatch process exposes (Prometheus conventions: ``_total`` counters,
``_seconds`` histograms, base units, labels of low cardinality: stage, reason, stream,
partition; never a frame). Defined once here, in prometheus-client's default registry, and
updated where things happen (next to each part's own stats).

A process updates only the metrics of the parts it runs; the embedded run (``linewatch
run``) runs them all. Stream labels are kept to the per-stream counters the operators asked
for (ingest drops and reconnects, alerts); a deployment with thousands of streams should
relabel or drop them at scrape time.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

# seconds: from a millisecond decode to a multi-second CPU batch
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

BUILD = Info("linewatch_build", "linewatch version")

# ---- worker --------------------------------------------------------------------------------
FRAMES_RECEIVED = Counter("linewatch_frames_received_total",
                          "Frame records a worker took from the bus (not the ends of sessions)")
FRAMES_SCORED = Counter("linewatch_frames_scored_total", "Frames scored and published to the scores topic")
DEAD_LETTERS = Counter("linewatch_dead_letters_total", "Records sent to the dead-letter topic",
                       ["stage", "reason"])
BATCH_SIZE = Histogram("linewatch_batch_size", "Frames per scoring batch", buckets=BATCH_BUCKETS)
MODEL_SECONDS = Histogram("linewatch_model_seconds", "Model time per batch (CUDA events on a GPU)",
                          buckets=LATENCY_BUCKETS)
DECODE_SECONDS = Histogram("linewatch_decode_seconds", "JPEG decode and resize time per batch",
                           buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("linewatch_queue_seconds", "Per frame: published by ingest -> into the model",
                          buckets=LATENCY_BUCKETS)
END_TO_END_SECONDS = Histogram("linewatch_end_to_end_seconds",
                               "Per frame: capture -> score published (files: ingest start + media time)",
                               buckets=LATENCY_BUCKETS)
CONSUMER_LAG = Gauge("linewatch_consumer_lag_records",
                     "Records behind the partition's end, as the broker last reported it",
                     ["group", "topic", "partition"])

# ---- ingest --------------------------------------------------------------------------------
INGEST_PUBLISHED = Counter("linewatch_ingest_frames_published_total", "Frames ingest published", ["stream"])
INGEST_LOST = Counter("linewatch_ingest_frames_lost_total",
                      "Frames published and acknowledged, then lost with a broker that came back without its log "
                      "(also in linewatch_ingest_frames_published_total, which counts sends)", ["stream"])
INGEST_DROPPED = Counter("linewatch_ingest_frames_dropped_total",
                         "Live frames dropped because publishing fell behind", ["stream"])
INGEST_RECONNECTS = Counter("linewatch_ingest_reconnects_total", "Live sources reconnected after an outage",
                            ["stream"])

# ---- sinks ---------------------------------------------------------------------------------
SCORES_RECEIVED = Counter("linewatch_sink_scores_received_total", "Score records a sink decoded", ["sink"])
ALERTS = Counter("linewatch_alerts_total", "Alerts raised (status open or closed)", ["stream", "status"])
CHANNEL_LAG = Gauge("linewatch_channel_lag_records",
                    "Alerts on the alerts topic an alert channel has not delivered or dead-lettered yet", ["channel"])
CHANNEL_OLDEST_AGE = Gauge("linewatch_channel_oldest_age_seconds",
                           "Age of the alert an alert channel is trying to deliver (0: none waiting)", ["channel"])
WEBHOOK_FAILURES = Counter("linewatch_webhook_failures_total", "Webhook POST attempts that failed")
ARCHIVE_WRITES = Counter("linewatch_archive_writes_total", "Anomalous frames archived (mask, overlay, frame, row)")

# ---- anchor cache --------------------------------------------------------------------------
ANCHOR_LOOKUPS = Counter("linewatch_anchor_cache_lookups_total",
                         "Text-anchor lookups by where they were found (miss: computed)", ["result"])
REDIS_ERRORS = Counter("linewatch_redis_errors_total", "Redis calls of the anchor cache that failed")


class GpuMemory(Collector):
    """``linewatch_gpu_memory_bytes{device, kind}``, read from torch at scrape time: allocated,
    reserved and the peak allocated. Registered by a worker whose model is on a GPU."""

    def __init__(self, device):
        self.device = device

    def collect(self):
        import torch

        family = GaugeMetricFamily("linewatch_gpu_memory_bytes", "GPU memory held by this process's tensors",
                                   labels=["device", "kind"])
        name = str(self.device)
        family.add_metric([name, "allocated"], torch.cuda.memory_allocated(self.device))
        family.add_metric([name, "reserved"], torch.cuda.memory_reserved(self.device))
        family.add_metric([name, "peak_allocated"], torch.cuda.max_memory_allocated(self.device))
        yield family


_gpu_watched: set[str] = set()


def watch_gpu(device) -> None:
    """Expose ``device``'s memory (once per device and process)."""
    if str(device) not in _gpu_watched:
        _gpu_watched.add(str(device))
        REGISTRY.register(GpuMemory(device))
