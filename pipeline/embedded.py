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
import signal
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
from ..sinks.archive_sink import run_archive_sink
from ..sinks.scores import run_scores_file
from ..workers.worker import ScoringWorker, WorkerStats
from .settings import Settings
from .wiring import alert_channels, build_worker, check_settings, policy_table

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    frames: int  # scored
    seconds: float  # first frame published -> last score published
    model_s: float
    alerts_jsonl: str
    archive: str
    dead: int
    worker: WorkerStats | None = None  # per-frame latencies, decode and busy time
    read: int = 0  # frames ingest read from the sources and published (a frame read as Ctrl-C came is not)
    dropped: int = 0  # live sources: frames dropped because scoring fell behind
    events: int = 0  # events opened (their alerts are in alerts_jsonl)
    interrupted: bool = False  # a Ctrl-C ended the reading early

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    def text(self) -> str:
        """What ``linewatch run`` prints at the end (after a Ctrl-C too)."""
        return (f"{self.frames} frames scored in {self.seconds:.1f} s ({self.fps:.2f} frames/s, "
                f"{self.model_s / max(self.seconds, 1e-9):.0%} of it in the model); {self.dead} dead letters\n"
                f"{self.read} frames read, {self.dropped} dropped{' (stopped by Ctrl-C)' if self.interrupted else ''}; "
                f"{self.events} event(s)\nalerts: {self.alerts_jsonl}\narchive: {self.archive}")


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
    ``attach(bus, settings)`` is called with the run's bus and settings before the model is
    built (``linewatch run --console`` serves the console there, showing the start-up stage).

    On the main thread, Ctrl-C (SIGINT) stops the reading: what was read is still scored and
    alerted, and the summary says ``interrupted``; a second Ctrl-C stops at once
    (KeyboardInterrupt). Files are read at most ``2 * max_batch`` frames ahead of the worker's
    commits, so that costs about two batches."""
    out = Path(out_dir)
    fresh_alerts = None if settings.alerts.jsonl else out / "alerts.jsonl"  # this run's own, not appended to the last's
    settings = settings.model_copy(update={
        "alerts": settings.alerts.model_copy(update={"jsonl": settings.alerts.jsonl or str(out / "alerts.jsonl")}),
        "archive": settings.archive or str(out / "archive")})
    check_inputs(sources, settings, stream_ids)
    out.mkdir(parents=True, exist_ok=True)
    if fresh_alerts is not None:
        fresh_alerts.unlink(missing_ok=True)

    topics = Topics(settings.topic_prefix)
    # a file is read a little ahead of the worker (its next batch ready), not to its end: a
    # Ctrl-C then costs about two batches. Live sources keep the bus's usual room.
    read_ahead = {} if any(is_live(s) for s in sources) else {topics.frames: 2 * settings.worker.max_batch - 1}
    # retain: the console's readers take no part in any group; a moment behind, they still see every record
    bus = MemoryBus(topics, partitions=1, max_message_bytes=settings.max_message_bytes, limits=read_ahead, retain=64)
    archive = Archive(settings.archive, max_pixels=settings.max_pixels)  # the console reads its folder
    if attach is not None:  # the console serves while the model loads (its live status shows the stage)
        attach(bus, settings)
    worker = build_worker(bus, settings, backbone)
    HEALTH.set("model", True, f"{worker.backbone.identity}, {len(worker.prepared)} profile(s) prepared")
    stop_sinks, stop_worker, stop_ingest = threading.Event(), threading.Event(), threading.Event()
    aborted = threading.Event()  # a second Ctrl-C: the parts' errors are its consequence, not news
    errors: list[BaseException] = []
    ingested: list = []  # ingest's stats, once it has read every source

    def guarded(target, *args, **kwargs):
        def body():
            try:
                target(*args, **kwargs)
            except BaseException as err:  # surfaced by the main thread
                if not aborted.is_set():
                    log.error("%s failed: %s", getattr(target, "__name__", "part"), err)
                errors.append(err)
                stop_worker.set()
                stop_sinks.set()
                bus.close()
        return threading.Thread(target=body, name=getattr(target, "__name__", "part"), daemon=True)

    def ingest() -> None:
        i = settings.ingest
        ingested.extend(run_ingest(bus, sources, stream_ids=stream_ids, fps=i.fps, max_size=i.max_size,
                                   jpeg_quality=i.jpeg_quality, realtime=i.realtime, stop=stop_ingest,
                                   progress=False, max_pixels=settings.max_pixels))

    # consumers join their groups before the first frame is published
    worker_consumer = bus.consumer([bus.topics.frames], worker.group)
    alert_sink = AlertSink(bus, policy_table(settings), alert_channels(settings), publish=settings.alerts.publish)
    sinks = [
        guarded(alert_sink.run, stop_sinks),
        guarded(run_archive_sink, bus, archive, stop=stop_sinks),
    ]
    if scores is not None:
        sinks.append(guarded(run_scores_file, bus, scores, stop=stop_sinks))
    for thread in sinks:
        thread.start()
    with bus.cond:  # the sinks join their groups before the first score exists
        while len(bus.members) < 1 + len(sinks) and not errors:
            bus.cond.wait(0.1)
    # The worker scores on this (the main) thread and ingest reads on another: the model's
    # OpenMP threads run measurably slower when a Python thread other than the main one drives them.
    reader = guarded(ingest)
    started = scored = time.monotonic()
    interrupt = _Interrupt(worker, stop_ingest)
    try:
        with interrupt, _scored_bar(worker, progress) as tick:
            def finished() -> bool:
                interrupt.say()
                if tick is not None:
                    tick(sum(s.published for s in ingested) if ingested else None)
                return bool(errors) or (bool(ingested) and bus.drained(bus.topics.frames))

            reader.start()
            worker.run(stop_worker, consumer=worker_consumer, until=finished)
            reader.join()
            scored = time.monotonic()  # the last score is out; the sinks may still be flushing
            _wait_drained(bus, bus.topics.scores, errors)
            _wait_delivered(alert_sink, errors)
    except BaseException:
        aborted.set()
        bus.close()  # a part waiting on the bus (ingest, for room) ends at once
        raise
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
                      worker=worker.stats, read=sum(s.published for s in ingested),
                      dropped=sum(s.dropped for s in ingested), events=alert_sink.stats.opened,
                      interrupted=interrupt.count > 0)


class _Interrupt:
    """SIGINT while the run reads (main thread only): the first stops the reading, and what was
    read is still scored; the second raises KeyboardInterrupt (stop at once). The previous
    handler is back on exit."""

    def __init__(self, worker: ScoringWorker, stop_ingest: threading.Event):
        self.worker, self.stop_ingest = worker, stop_ingest
        self.count, self.scored_at_signal, self.said = 0, 0, False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        self.scored_at_signal = self.worker.stats.frames
        self.stop_ingest.set()

    def say(self) -> None:
        """Logged from the loop, not from the handler (which may interrupt a log call)."""
        if self.count and not self.said:
            self.said = True
            log.warning("interrupted after %d frames scored: scoring the frames already read, then stopping "
                        "(Ctrl-C again to stop at once)", self.scored_at_signal)


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
def _scored_bar(worker: ScoringWorker, progress: bool):
    """The run's progress bar, of frames scored; ``tick(total)`` updates it (the total is known
    once ingest has read everything). Log lines meanwhile are printed above it, not through it
    (tqdm's logging redirect keeps linewatch's formatter, redaction included)."""
    if not progress:
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(), tqdm(total=None, desc="scored", unit="frame", dynamic_ncols=True) as bar:
        def tick(total: int | None = None):
            if total is not None and bar.total != total:
                bar.total = total
                bar.refresh()
            if worker.stats.frames > bar.n:
                bar.update(worker.stats.frames - bar.n)
        yield tick
        tick()
