"""Sources -> frame records on the bus: JPEG value, ``FrameMeta`` header, stream id key.

Recorded sources (files, folders) never drop a frame: the producer's blocking send paces
them to their consumers. Live sources cannot wait, so a grabber thread keeps reading into
a small buffer and, when publishing falls behind, the oldest frames are dropped and counted.
However a session ends (the source ended, ingest was stopped, the source failed), its last
record is a ``SessionEnd``: the alert sink closes the session's events on it.
A broker outage is waited out inside the bus (a file is paced by it like by a slow
consumer); a stop meanwhile ends the run at once, counting the frames not acknowledged.
Frames a broker acknowledged and then lost (it came back without its log) are counted as
lost, not published.
A frame is scaled down to the pixel budget before publishing, and further if its JPEG
would not fit a message.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import cv2
import numpy as np

from ..bus import Bus, record_size
from ..bus.jpeg import DEFAULT_MAX_PIXELS
from ..bus import messages
from ..bus.messages import META_HEADER, FrameMeta, SessionEnd, encode
from ..bus.outages import OUTAGES, StopRequested
from ..ops import metrics
from ..ops.health import HEALTH
from .sources import Backoff, IngestError, Source, VideoFile, open_source, webcam_index
from .srt import TelemetryTrack, find_sidecar, load_track

log = logging.getLogger(__name__)

PART = "ingest"


@dataclass
class IngestStats:
    stream: str
    source: str
    read: int = 0  # frames decoded from the source
    thinned: int = 0  # left out to reach the target fps
    published: int = 0
    dropped: int = 0  # live only: oldest buffered frames dropped because publishing lagged
    skipped: int = 0  # undecodable inputs (corrupt images)
    reconnects: int = 0
    unacknowledged: int = 0  # published but not acknowledged by the broker when a stop cut an outage short
    lost: int = 0  # acknowledged, then lost with the broker (it came back without its log): not in published
    seconds: float = 0.0
    error: str | None = None  # why a live source ended early (gave up reconnecting)

    def summary(self) -> str:
        lost = f", lost {self.lost} with the broker" if self.lost else ""
        text = (f"{self.stream}: published {self.published} of {self.read} read{lost}, dropped {self.dropped}, "
                f"thinned {self.thinned}, skipped {self.skipped}, reconnects {self.reconnects}, "
                f"{self.seconds:.1f} s")
        if self.unacknowledged:
            text += f", {self.unacknowledged} not acknowledged (stopped during a broker outage)"
        return text + (f" — ended early: {self.error}" if self.error else "")


def default_stream_id(spec: str) -> str:
    """File stem, folder name, host+path of a URL, or ``webcamN``; only ``[A-Za-z0-9._-]``."""
    spec = spec.strip()
    if webcam_index(spec) is not None:
        return f"webcam{webcam_index(spec)}"
    if "://" in spec:
        parts = urlsplit(spec)  # host, port and path; never the credentials
        raw = f"{parts.hostname or ''}{f'-{parts.port}' if parts.port else ''}{parts.path}"
    else:
        path = Path(spec).expanduser()
        raw = path.name if spec.endswith(("/", "\\")) or _is_dir(path) else path.stem
        raw = raw or path.resolve().name
    sanitised = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._-")
    return sanitised[:128] or "stream"


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long for the file system: not a folder we can read
        return False


def check_stream_id(stream: str) -> str:
    """The message schema's rule (``bus.messages.check_stream_id``), as an IngestError."""
    try:
        return messages.check_stream_id(stream)
    except ValueError as err:
        raise IngestError(str(err)) from None


class Ingestor:
    """Publishes one source's frames to ``bus.topics.frames`` as stream ``stream``.

    ``realtime=True`` paces a recorded source at its recorded speed (live sources always
    run at their own pace). Telemetry comes from the video's SRT sidecar when one exists,
    or from ``telemetry``. ``stop`` ends the run cleanly between frames."""

    def __init__(self, source: Source, bus: Bus, *, stream: str | None = None, jpeg_quality: int = 90,
                 realtime: bool = False, telemetry: TelemetryTrack | None = None,
                 stop: threading.Event | None = None, buffer: int = 8):
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        self.source, self.bus = source, bus
        self.stream = check_stream_id(stream or default_stream_id(source.uri))
        self.jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        self.realtime = realtime
        self.stop = stop or threading.Event()
        self.buffer_size = buffer
        if telemetry is None and isinstance(source, VideoFile):
            sidecar = find_sidecar(source.path)
            telemetry = load_track(sidecar) if sidecar else None
        self.telemetry = telemetry
        self.stats = IngestStats(self.stream, source.uri)
        # seq restarts at 0 with every run; the session tells this run's frames from the last's
        self.session = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        self.last_ts = 0.0  # capture time of the last frame published
        self.producer = bus.producer()
        self.loop = f"ingest:{self.stream}"  # its heartbeat (/healthz)
        self._reconnects = 0  # source reconnections already counted in the metric
        self.shrunk = False  # said once that frames are scaled down to fit a message

    def run(self, on_frame: Callable[[IngestStats], None] | None = None) -> IngestStats:
        """Publish until the source ends or ``stop`` is set; ``on_frame`` sees the stats after
        each published frame (progress display)."""
        started, on_frame = time.monotonic(), on_frame or (lambda stats: None)
        OUTAGES.register(PART)
        ending = "failed"
        try:
            (self._run_live if self.source.live else self._run_recorded)(on_frame)
            ending = "failed" if self.stats.error else "stopped" if self.stop.is_set() else "end"
        except StopRequested as err:  # stopped while the broker was down
            log.warning("ingest %s: %s", self.stream, err)
            ending = "stopped"
        finally:
            HEALTH.stop_beating(self.loop)
            self._end_session(ending)
            # flushes: every frame is acknowledged before the run returns, unless a stop cut an outage short
            self.stats.unacknowledged = self.producer.close() or 0
            self.stats.lost = self.producer.lost  # the broker acknowledged them, then came back without them
            self.stats.published -= self.stats.lost
            metrics.INGEST_LOST.labels(self.stream).inc(self.stats.lost)
            self._update_counts(started)
            log.info("ingest %s", self.stats.summary())
        on_frame(self.stats)  # the final counts (frames thinned after the last publish)
        return self.stats

    def _update_counts(self, started: float) -> None:
        counts = self.source.counts
        self.stats.read, self.stats.thinned = counts.read, counts.thinned
        self.stats.skipped, self.stats.reconnects = counts.skipped, counts.reconnects
        self.stats.seconds = time.monotonic() - started

    def _run_recorded(self, on_frame) -> None:
        wall_start, clock_start = time.time(), time.monotonic()
        for image, pts in self.source:
            if self.realtime:  # wait until this frame's moment at recorded speed
                self.stop.wait(max(0.0, clock_start + pts - time.monotonic()))
            if self.stop.is_set():
                break
            self._publish(image, pts, wall_start + pts)
            self.stats.read = self.source.counts.read
            on_frame(self.stats)

    def _run_live(self, on_frame) -> None:
        frames: deque[tuple[np.ndarray, float, float]] = deque(maxlen=self.buffer_size)
        ready = threading.Condition()
        finished = threading.Event()  # the grabber has ended
        quit_grabbing = threading.Event()  # the publishing loop has ended
        failure: list[BaseException] = []

        def grab() -> None:
            try:
                for image, pts in self.source:
                    grabbed_at = time.time()
                    with ready:
                        if len(frames) == frames.maxlen:
                            self.stats.dropped += 1  # the deque evicts the oldest on append
                            metrics.INGEST_DROPPED.labels(self.stream).inc()
                        frames.append((image, pts, grabbed_at))
                        ready.notify()
                    if self.stop.is_set() or quit_grabbing.is_set():
                        break
            except BaseException as err:  # noqa: BLE001 (handed to the publishing thread)
                failure.append(err)
            finally:
                finished.set()
                with ready:
                    ready.notify()

        grabber = threading.Thread(target=grab, name=f"grab-{self.stream}", daemon=True)
        grabber.start()
        try:
            while True:
                with ready:
                    while not frames and not finished.is_set() and not self.stop.is_set():
                        HEALTH.beat(self.loop)  # a silent camera is not a hung process: it reconnects
                        ready.wait(0.1)
                    if self.stop.is_set() or not frames:
                        self.stats.dropped += len(frames)  # stopped with frames still buffered
                        metrics.INGEST_DROPPED.labels(self.stream).inc(len(frames))
                        break
                    image, pts, grabbed_at = frames.popleft()
                self._publish(image, pts, grabbed_at)
                self.stats.read = self.source.counts.read
                on_frame(self.stats)
        finally:
            quit_grabbing.set()
            grabber.join(timeout=2.0)  # a read blocked on a silent camera ends at its read timeout
        if failure:
            err = failure[0]
            if not isinstance(err, IngestError):
                raise err
            self.stats.error = str(err)
            log.error("ingest %s: %s", self.stream, err)

    def _end_session(self, reason: str) -> None:
        if not self.stats.published:
            return  # nobody saw the session
        marker = SessionEnd(stream=self.stream, session=self.session, frames=self.stats.published,
                            ts=self.last_ts, reason=reason)
        try:
            self.producer.send(self.bus.topics.frames, b"", key=self.stream.encode(),
                               headers=((META_HEADER, encode(marker)),))
        except Exception as err:  # noqa: BLE001 - never hide why the run ended
            log.warning("ingest %s: the end of the session was not sent (%s); its open events close "
                        "when the stream's capture time moves on", self.stream, err)

    def _publish(self, image: np.ndarray, pts: float, ts: float) -> None:
        image, jpeg = self._encode(image)
        height, width = image.shape[:2]
        meta = FrameMeta(stream=self.stream, session=self.session, seq=self.stats.published, ts=ts, pts=pts, source=self.source.uri,
                         width=width, height=height,
                         telemetry=self.telemetry.at(pts) if self.telemetry else None)
        self.producer.send(self.bus.topics.frames, jpeg, key=self.stream.encode(),
                           headers=((META_HEADER, encode(meta)),))  # record time: when published
        self.stats.published += 1
        self.last_ts = ts
        metrics.INGEST_PUBLISHED.labels(self.stream).inc()
        HEALTH.beat(self.loop)
        if self.source.counts.reconnects > self._reconnects:  # counted by the source, as it reconnects
            metrics.INGEST_RECONNECTS.labels(self.stream).inc(self.source.counts.reconnects - self._reconnects)
            self._reconnects = self.source.counts.reconnects

    def _encode(self, image: np.ndarray) -> tuple[np.ndarray, bytes]:
        """The frame as JPEG, scaled down until it fits a message with room for its metadata."""
        room = self.bus.max_message_bytes - record_size(b"", self.stream.encode(), ((META_HEADER, bytes(8192)),))
        while True:
            ok, jpeg = cv2.imencode(".jpg", image, self.jpeg_params)
            if not ok:
                raise IngestError(f"{self.stream}: JPEG encoding failed for a {image.shape} frame")
            if len(jpeg) <= room or min(image.shape[:2]) < 16:
                return image, jpeg.tobytes()
            if not self.shrunk:
                log.warning("ingest %s: a %dx%d frame's JPEG (%d bytes) exceeds the %d-byte message limit; "
                            "scaling such frames down", self.stream, image.shape[1], image.shape[0], len(jpeg),
                            self.bus.max_message_bytes)
                self.shrunk = True
            image = cv2.resize(image, None, fx=0.7, fy=0.7, interpolation=cv2.INTER_AREA)


def run_ingest(bus: Bus, specs: list[str], *, stream_ids: list[str] | None = None, fps: float | None = None,
               max_size: int | None = None, jpeg_quality: int = 90, realtime: bool = False,
               stop: threading.Event | None = None, progress: bool = True, image_fps: float = 1.0,
               backoff: Backoff = Backoff(), max_pixels: int = DEFAULT_MAX_PIXELS) -> list[IngestStats]:
    """Ingest several sources at once, a thread each, with one progress bar per source.

    Every source is opened before the first frame is published, so a bad spec fails the
    whole run up front (IngestError). A live source that gives up reconnecting ends with
    ``stats.error`` set while the others go on; any other failure stops all and is raised."""
    if stream_ids is not None and len(stream_ids) != len(specs):
        raise IngestError(f"{len(stream_ids)} stream id(s) for {len(specs)} source(s)")
    stream_ids = [check_stream_id(s) for s in stream_ids] if stream_ids else _unique_defaults(specs)
    if len(set(stream_ids)) != len(stream_ids):
        raise IngestError(f"duplicate stream ids in {stream_ids}: each source needs its own")
    stop = stop or threading.Event()
    sources: list[Source] = []
    try:
        for spec in specs:
            sources.append(open_source(spec, fps=fps, max_size=max_size, image_fps=image_fps, backoff=backoff,
                                       stop=stop, max_pixels=max_pixels))
        ingestors = [Ingestor(source, bus, stream=stream, jpeg_quality=jpeg_quality, realtime=realtime, stop=stop)
                     for source, stream in zip(sources, stream_ids)]
    except BaseException:
        for source in sources:
            source.close()
        raise
    HEALTH.set("sources", True, f"{len(sources)} source(s) open")

    bars = _progress_bars(ingestors) if progress else [None] * len(ingestors)
    errors: list[BaseException] = []

    def work(ingestor: Ingestor, bar) -> None:
        def show(stats: IngestStats) -> None:
            bar.update(stats.read - bar.n)
            bar.set_postfix(published=stats.published, dropped=stats.dropped, refresh=False)
        try:
            ingestor.run(show if bar is not None else None)
        except BaseException as err:  # noqa: BLE001 (re-raised by the caller's thread)
            ingestor.stats.error = str(err)
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=work, args=(ingestor, bar), name=f"ingest-{ingestor.stream}")
               for ingestor, bar in zip(ingestors, bars)]
    with _logging_around_bars(progress):
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:  # Ctrl-C: let every source end cleanly (and flush) first
            stop.set()
            for thread in threads:
                thread.join()
            raise
        for bar in bars:
            if bar is not None:
                bar.close()
    if errors:
        raise errors[0]
    return [ingestor.stats for ingestor in ingestors]


def _unique_defaults(specs: list[str]) -> list[str]:
    """Default ids, with ``-2``, ``-3`` ... where two sources would share one."""
    out: list[str] = []
    for spec in specs:
        base = default_stream_id(spec)
        stream, n = base, 1
        while stream in out:
            n += 1
            stream = f"{base[:120]}-{n}"
        out.append(stream)
    return out


def _logging_around_bars(progress: bool):
    """Log lines printed above the bars instead of through them."""
    if not progress:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _progress_bars(ingestors: list[Ingestor]):
    from tqdm import tqdm

    return [tqdm(total=i.source.total, desc=i.stream, unit="frame", position=n, leave=True, dynamic_ncols=True)
            for n, i in enumerate(ingestors)]

