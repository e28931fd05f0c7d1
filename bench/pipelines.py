"""End to end: the clip through the whole pipeline (ingest -> bus -> worker -> alert and
archive sinks), embedded (in-process bus, ``run_embedded``) and on Kafka.

Both time first frame published -> last score published, as ``linewatch run`` reports, with
the scoring settings the sweep picked and the same backbone object. Latency per frame is
the worker's: batch handling began -> score sent (decode, model, publishing), with
publish -> score sent (which adds the time a frame queued behind the backlog: the file is
ingested as fast as it decodes) kept in ``extra``.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from pathlib import Path

from ..bus import BusError, Topics
from ..bus.messages import META_HEADER, FrameMeta, encode
from ..pipeline.embedded import run_embedded
from ..pipeline.settings import Settings
from ..pipeline.wiring import alert_channels, build_worker, policy_table
from ..scoring.backbone import Backbone
from ..sinks.alert_state import state_topic
from .measure import MemoryWatch, PartResult, percentiles
from .workload import Workload

log = logging.getLogger(__name__)

LATENCY_IS = "its batch in the worker: handling began to score sent"
STREAM = "bench"


def _archived(folder: Path) -> int:
    return len(list(folder.rglob("*mask.png"))) if folder.is_dir() else 0


def _fresh(folder: Path) -> Path:
    """The part's own output folder, emptied: archive counts are this run's alone."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def embedded_pipeline(workload: Workload, settings: Settings, backbone: Backbone, out_dir: Path,
                      progress: bool = True) -> PartResult:
    _fresh(out_dir)
    with MemoryWatch(backbone.device) as memory:
        summary = run_embedded([str(workload.video)], settings, str(out_dir), stream_ids=[STREAM], progress=progress,
                               backbone=backbone)
    stats = summary.worker
    return PartResult("embedded", summary.frames, summary.seconds, percentiles(list(stats.service_s)), LATENCY_IS,
                      memory.rss_mb, memory.gpu_mb, memory.other_cpu, settings=_settings_json(settings, "memory"),
                      extra={"end_to_end_ms": percentiles(list(stats.end_to_end_s)),
                             "model_share": summary.model_s / summary.seconds if summary.seconds else None,
                             "worker_busy_share": stats.busy_s / summary.seconds if summary.seconds else None,
                             "dead_letters": summary.dead, "anomalous_frames": _archived(out_dir / "archive" / STREAM)})


def kafka_pipeline(workload: Workload, settings: Settings, backbone: Backbone, servers: str, out_dir: Path,
                   progress: bool = True, delete_topics: bool = True) -> PartResult:
    """The same parts as ``linewatch ingest | worker | sink alerts | sink archive`` in this process
    (the worker on the main thread, the others in threads) on one Kafka (fresh topic prefix and consumer groups, so nothing on a shared
    broker interferes). Warm-up frames go through first, so the consumer group has formed and
    the model is warm before the clock starts."""
    from ..bus.kafka import KafkaBus
    from ..ingest.publisher import run_ingest
    from ..sinks.alert_sink import run_alert_sink
    from ..sinks.archive import Archive
    from ..sinks.archive_sink import run_archive_sink

    prefix = f"lwbench-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    _fresh(out_dir)
    settings = settings.model_copy(update={"alerts": settings.alerts.model_copy(
        update={"jsonl": str(out_dir / "alerts.jsonl")})})
    bus = KafkaBus(servers, Topics(prefix), partitions=1)
    errors: list[BaseException] = []
    stop_worker, stop_sinks = threading.Event(), threading.Event()

    def guarded(target, *args, **kwargs) -> threading.Thread:
        def body():
            try:
                target(*args, **kwargs)
            except BaseException as err:  # reported by the waiting loop below
                errors.append(err)
        return threading.Thread(target=body, name=f"bench-{target.__name__}", daemon=True)

    with MemoryWatch(backbone.device) as memory:
        worker = build_worker(bus, settings, backbone, group=f"{prefix}-workers")
        warm = settings.worker.max_batch
        clock: dict[str, float] = {}  # began, and the counts the worker must reach

        def drive() -> None:
            """Warm-up frames, then (clock started) the clip through ``linewatch ingest``'s code."""
            producer = bus.producer()
            for seq in range(warm):
                meta = FrameMeta(stream=f"{STREAM}-warmup", seq=seq, ts=time.time(), source="bench",
                                 width=workload.width, height=workload.height)
                producer.send(bus.topics.frames, workload.jpegs[seq % len(workload.jpegs)],
                              key=meta.stream.encode(), headers=((META_HEADER, encode(meta)),))
            producer.close()
            _wait_scored(worker, warm, errors, stop_worker, "warm-up frames", timeout_s=600)
            clock.update(began=time.time(), model_s=worker.stats.model_s, busy_s=worker.stats.busy_s)
            clock["published"] = sum(s.published for s in run_ingest(
                bus, [str(workload.video)], stream_ids=[STREAM], progress=False))

        threads = [guarded(drive),
                   guarded(run_alert_sink, bus, policy_table(settings), alert_channels(settings),
                           stop=stop_sinks, group=f"{prefix}-alerts"),
                   guarded(run_archive_sink, bus, Archive(str(out_dir / "archive")), stop=stop_sinks,
                           group=f"{prefix}-archive")]
        for thread in threads:
            thread.start()
        # the worker on the main thread, as `linewatch worker` runs it (see ScoringWorker.run)
        bar = _bar(progress, len(workload.jpegs))
        try:
            def finished() -> bool:
                if bar is not None and "published" in clock:
                    bar.update(worker.stats.frames - warm - bar.n)
                handled = worker.stats.frames + worker.stats.dead  # a dead-lettered frame is done too
                return bool(errors) or ("published" in clock and handled >= warm + clock["published"])

            worker.run(stop_worker, until=finished)
        finally:
            if bar is not None:
                bar.close()
            stop_worker.set()
            stop_sinks.set()
            for thread in threads:
                thread.join(timeout=60)
    if errors:
        raise errors[0]
    published = int(clock["published"])
    seconds = worker.stats.last_score_at - clock["began"]
    model_s, busy_s = worker.stats.model_s - clock["model_s"], worker.stats.busy_s - clock["busy_s"]
    if delete_topics:
        _delete_topics(bus)
    stats = worker.stats
    return PartResult("kafka", published, seconds, percentiles(list(stats.service_s)[warm:]), LATENCY_IS,
                      memory.rss_mb, memory.gpu_mb, memory.other_cpu, settings=_settings_json(settings, "kafka"),
                      extra={"end_to_end_ms": percentiles(list(stats.end_to_end_s)[warm:]),
                             "model_share": model_s / seconds, "worker_busy_share": busy_s / seconds,
                             "broker": servers, "topic_prefix": prefix, "dead_letters": stats.dead,
                             "anomalous_frames": _archived(out_dir / "archive" / STREAM)})


def _wait_scored(worker, count: int, errors: list, stop: threading.Event, what: str, timeout_s: float) -> None:
    """Until the worker has sent ``count`` scores; a failed part, a stop or a stall ends it."""
    deadline = time.monotonic() + timeout_s
    while worker.stats.frames + worker.stats.dead < count:
        if errors or stop.is_set():
            raise BusError(f"Kafka pipeline: stopped before the {what} were scored")
        if time.monotonic() > deadline:
            raise BusError(f"Kafka pipeline: {what} not scored within {timeout_s:.0f} s "
                           f"({worker.stats.frames} of {count})")
        time.sleep(0.05)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="scored", unit="frame", dynamic_ncols=True)


def _delete_topics(bus) -> None:
    """Best effort: a benchmark leaves no topics behind on a broker it did not start."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bus.servers, client_id="linewatch-bench")
        try:
            admin.delete_topics([*bus.topics.all(), state_topic(bus.topics.scores, f"{bus.topics.prefix}-alerts")])
        finally:
            admin.close()
    except Exception as err:  # noqa: BLE001 - leftovers are harmless, say so and go on
        log.warning("could not delete the benchmark topics %s.*: %s", bus.topics.prefix, err)


def _settings_json(settings: Settings, bus: str) -> dict:
    w = settings.worker
    return {"bus": bus, "batch": w.max_batch, "max_wait_ms": w.max_wait_ms, "precision": w.precision,
            "compiled": w.compile, "method": settings.profile.method, "threshold": settings.profile.threshold,
            "calibration": settings.profile.calibration}
