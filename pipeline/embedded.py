"""The embedded run: everything in one process (``linewatch run``).

It is the same pipeline as the distributed one — ingest, a scoring worker and both sinks
talking through the bus in the same records — only the bus is in process and the anchor
cache is local. ``OUT/alerts.jsonl`` holds this run's alerts only (replaced at each run,
unless ``alerts.jsonl`` is configured elsewhere); the archive keeps every run's frames, by
session. The worker scores on the main thread, ingest and the sinks run in threads; the run
ends when every frame has been scored, every score has reached both sinks (each file
session's end marker among them, which closes its events) and every alert has been delivered.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..bus import Topics
from ..bus.memory import MemoryBus
from ..ingest.publisher import check_stream_id, run_ingest
from ..ingest.sources import is_live, open_source
from ..ops.health import HEALTH
from ..scoring.backbone import Backbone
from ..sinks.alert_sink import AlertSink
from ..sinks.archive import Archive
from ..sinks.runner import run_archive_sink
from ..sinks.scores import run_scores_file
from ..workers.worker import ScoringWorker, WorkerStats
from .settings import Settings
from .wiring import alert_channels, build_worker, check_settings, policy_table

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    frames: int
    seconds: float  # first frame published -> last score published
    model_s: float
    alerts_jsonl: str
    archive: str
    dead: int
    worker: WorkerStats | None = None  # per-frame latencies, decode and busy time

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def check_inputs(sources: list[str], settings: Settings, stream_ids: list[str] | None = None) -> None:
    """What a user can get wrong about a run that needs no model: fails before anything starts."""
    check_settings(settings)
    for spec in sources:  # a bad path fails here, before the model is built; live sources connect later
        if not is_live(spec):
            open_source(spec, max_pixels=settings.max_pixels).close()
    for stream in stream_ids or ():
        check_stream_id(stream)


def run_embedded(sources: list[str], settings: Settings, out_dir: str, stream_ids: list[str] | None = None,
                 progress: bool = True, backbone: Backbone | None = None, scores: str | None = None,
                 attach: Callable[[MemoryBus, Settings], None] | None = None) -> RunSummary:
    """``scores``: also write every frame's score to this JSONL file (``sinks.scores``).
    ``attach(bus, settings)`` is called once the model is ready, before the first frame is
    read, with the run's bus and settings (``linewatch run --console`` starts the console there)."""
    out = Path(out_dir)
    fresh_alerts = None if settings.alerts.jsonl else out / "alerts.jsonl"  # this run's own, not appended to the last's
    settings = settings.model_copy(update={
        "alerts": settings.alerts.model_copy(update={"jsonl": settings.alerts.jsonl or str(out / "alerts.jsonl")}),
        "archive": settings.archive or str(out / "archive")})
    check_inputs(sources, settings, stream_ids)
    out.mkdir(parents=True, exist_ok=True)
    if fresh_alerts is not None:
        fresh_alerts.unlink(missing_ok=True)

    bus = MemoryBus(Topics(settings.topic_prefix), partitions=1, max_message_bytes=settings.max_message_bytes)
    worker = build_worker(bus, settings, backbone)
    HEALTH.set("model", True, f"{worker.backbone.identity}, {len(worker.prepared)} profile(s) prepared")
    stop_sinks, stop_worker, stop_ingest = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []
    published: list[int] = []  # set once ingest has read every source

    def guarded(target, *args, **kwargs):
        def body():
            try:
                target(*args, **kwargs)
            except BaseException as err:  # surfaced by the main thread
                log.error("%s failed: %s", getattr(target, "__name__", "part"), err)
                errors.append(err)
                stop_worker.set()
                stop_sinks.set()
                bus.close()
        return threading.Thread(target=body, name=getattr(target, "__name__", "part"), daemon=True)

    def ingest() -> None:
        i = settings.ingest
        stats = run_ingest(bus, sources, stream_ids=stream_ids, fps=i.fps, max_size=i.max_size,
                           jpeg_quality=i.jpeg_quality, realtime=i.realtime, stop=stop_ingest, progress=progress,
                           max_pixels=settings.max_pixels)
        published.append(sum(s.published for s in stats))

    # consumers join their groups before the first frame is published
    worker_consumer = bus.consumer([bus.topics.frames], worker.group)
    alert_sink = AlertSink(bus, policy_table(settings), alert_channels(settings), publish=settings.alerts.publish)
    sinks = [
        guarded(alert_sink.run, stop_sinks),
        guarded(run_archive_sink, bus, Archive(settings.archive, max_pixels=settings.max_pixels), stop=stop_sinks),
    ]
    if scores is not None:
        sinks.append(guarded(run_scores_file, bus, scores, stop=stop_sinks))
    for thread in sinks:
        thread.start()
    with bus.cond:  # the sinks join their groups before the first score exists
        while len(bus.members) < 1 + len(sinks) and not errors:
            bus.cond.wait(0.1)
    if attach is not None:
        attach(bus, settings)
    # The worker scores on this (the main) thread and ingest reads on another: the model's
    # OpenMP threads run measurably slower when a Python thread other than the main one drives them.
    reader = guarded(ingest)
    started = scored = time.monotonic()
    interrupted = False
    try:
        with _scored_bar(worker, len(sources), progress) as tick:
            def finished() -> bool:
                if tick is not None:
                    tick(published[0] if published else None)
                return bool(errors) or (bool(published) and bus.drained(bus.topics.frames))

            reader.start()
            try:
                worker.run(stop_worker, consumer=worker_consumer, until=finished)
            except KeyboardInterrupt:  # the end of a live run: what was read still gets scored and alerted
                log.warning("interrupted: scoring the frames already read (Ctrl-C again to stop at once)")
                interrupted = True
                stop_ingest.set()
                # a batch cut short was not committed: a fresh member of the group reads it again
                worker.run(stop_worker, consumer=bus.consumer([bus.topics.frames], worker.group), until=finished)
        reader.join()
        scored = time.monotonic()  # the last score is out; the sinks may still be flushing
        _wait_drained(bus, bus.topics.scores, errors)
        _wait_delivered(alert_sink, errors)
        if interrupted:
            raise KeyboardInterrupt
    finally:
        stop_ingest.set()
        stop_worker.set()
        stop_sinks.set()
        for thread in [reader, *sinks]:
            if thread.is_alive():
                thread.join(timeout=60)
    if errors:
        raise errors[0]
    return RunSummary(frames=worker.stats.frames, seconds=scored - started, model_s=worker.stats.model_s,
                      alerts_jsonl=settings.alerts.jsonl, archive=settings.archive, dead=worker.stats.dead,
                      worker=worker.stats)


def _wait_drained(bus, topic: str, errors: list) -> None:
    """Until every group reading ``topic`` has committed all of it."""
    with bus.cond:
        while not errors and not bus.drained(topic):
            bus.cond.wait(0.2)


def _wait_delivered(sink: AlertSink, errors: list) -> None:
    """Until every alert output has delivered (or dead-lettered) what it was given."""
    while not errors and not sink.delivered():
        time.sleep(0.05)


@contextlib.contextmanager
def _scored_bar(worker: ScoringWorker, position: int, progress: bool):
    """A progress bar of frames scored, below the ingest bars; ``tick(total)`` updates it (the
    total is known once ingest has read everything)."""
    if not progress:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=None, desc="scored", unit="frame", position=position, dynamic_ncols=True) as bar:
        def tick(total: int | None = None):
            if total is not None and bar.total != total:
                bar.total = total
                bar.refresh()
            if worker.stats.frames > bar.n:
                bar.update(worker.stats.frames - bar.n)
        yield tick
        tick()
