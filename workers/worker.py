"""The scoring worker: a member of a consumer group on the frames topic.

Loop: gather a micro-batch across streams (up to ``max_batch`` frames or ``max_wait_ms``
after the first; the very first batch holds one frame, so the first score comes as soon as the
model is ready, not a whole batch later), decode JPEGs into one batch on the model's device (``frames.py``), score
each profile's frames in one batch, with the image tower in the configured ``precision``,
publish one ScoreMsg per frame, wait for the broker to acknowledge them, and only then commit the
frames' offsets (at-least-once: a worker killed mid-batch leaves its frames uncommitted,
and the group's next owner scores them again; sinks de-duplicate by stream and sequence).
A frame that cannot be read goes to the dead-letter topic with the reason. The end of an
ingest session (``SessionEnd``) is forwarded to the scores topic after the batch's scores,
so it follows the scores of every frame before it on its partition.

No record stops the loop: whatever fails while one frame is read, decoded, scored or published
sends that frame to the dead-letter topic with the stage and reason, and the loop goes on.
When the model fails on a batch, each frame is scored alone; a frame it still fails on is
dead-lettered only if the model scores a blank frame fine: otherwise the fault is the
worker's (a lost device), the error stops it and nothing is committed. A score too large for the bus carries its frame
re-encoded smaller (``frame_jpeg_note="reduced"``), or none (``"dropped"``). An outage of
the broker is waited out by the bus (``bus.kafka``); a stop meanwhile leaves the batch
uncommitted for the group.

This module is the poll/commit loop and the batch's way through the model; its parts are
their own units: ``batcher`` (which records make a batch), ``reloader`` (profiles prepared
again when their folders change), ``score_messages`` (a scored frame's message, within the
bus's size), ``device_work`` (the model's time and results, read without blocking) and
``telemetry`` (heartbeat, readiness, lag, summary). The health and outage registries are
given to it (the process's own by default, as the CLI runs it).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..bus import Bus, BusError, Record, RecordTooLarge
from ..bus.jpeg import DEFAULT_MAX_PIXELS
from ..bus.messages import (
    DeadLetter,
    FrameMeta,
    Latency,
    MessageError,
    SessionEnd,
    encode,
    frame_header,
)
from ..bus.outages import OUTAGES, Outages, StopRequested, describe
from ..ops import metrics
from ..ops.health import HEALTH, Health
from ..scoring.backbone import Backbone
from ..scoring.precision import autocast_dtype, resolve_precision
from ..scoring.prompts import PromptPack
from .anchors import AnchorCache
from .batcher import Batcher
from .device_work import DeviceClock, to_host
from .frames import FrameDecoder
from .prepared import PreparedProfile
from .prepared_cache import PreparedCache
from .profiles import ProfileTable, StreamProfile
from .reloader import ProfileReloader
from .score_messages import encode_within, reduce_maps, score_message
from .telemetry import WorkerTelemetry

log = logging.getLogger(__name__)

LATENCY_SAMPLES = 100_000  # per-frame latencies kept for percentiles (the most recent ones)
PART = "worker"


@dataclass
class WorkerStats:
    frames: int = 0
    batches: int = 0
    dead: int = 0
    model_s: float = 0.0
    decode_s: float = 0.0
    busy_s: float = 0.0  # wall time with a batch in hand, poll return to published (overlapping batches count once)
    started: float = field(default_factory=time.monotonic)
    # per scored frame, seconds: batch handling began -> its score sent (decode, model, publish)
    service_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    # per scored frame, seconds: frame published -> its score sent (adds the time it queued)
    end_to_end_s: deque = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    last_score_at: float = 0.0  # time.time() of the last score sent


@dataclass
class _Frame:
    record: Record
    meta: FrameMeta
    index: int  # row in the decoded batch


class ScoringWorker:
    def __init__(self, bus: Bus, backbone: Backbone, profiles: ProfileTable, anchors: AnchorCache, *,
                 prompts: PromptPack | None = None, max_batch: int = 8, max_wait_ms: float = 20.0,
                 precision: str = "auto", group: str | None = None, source_topic: str | None = None,
                 results_topic: str | None = None, worker_id: str | None = None, summary_s: float = 0.0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, reload_s: float = 5.0, cache: PreparedCache | None = None,
                 health: Health = HEALTH, outages: Outages = OUTAGES):
        """``cache``: reference memories and thresholds kept across starts (``prepared_cache``).
        ``health``: where the loop beats and its assignment is reported (``/healthz``,
        ``/readyz``); ``outages``: where the worker part is registered. Both default to the
        process's own (the CLI's); a test or an embedding process may give its own."""
        self.bus, self.backbone, self.profiles, self.anchors = bus, backbone, profiles, anchors
        self.cache = cache
        self.health, self.outages = health, outages
        self.prompts = prompts or PromptPack.load()
        self.batcher = Batcher(max_batch, max_wait_ms / 1000.0)
        self.precision = resolve_precision(precision, backbone.device)
        self.compute_dtype = autocast_dtype(self.precision)
        self.decoder = FrameDecoder(backbone.image_size, backbone.device, max_pixels=max_pixels)
        self.group = group or bus.topics.group("workers")
        self.source_topic = source_topic or bus.topics.frames
        self.results_topic = results_topic or bus.topics.scores
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.reloader = ProfileReloader(self._prepare, reload_s)  # changed reference folders: prepared again
        self.prepared: dict[str, PreparedProfile] = self.reloader.prepared  # by profile key
        self.stats = WorkerStats()
        # one batch in flight while the previous one is published (see ``run``): pays where the
        # model runs asynchronously on a GPU; on a CPU it would only delay each batch's scores
        self.overlap = backbone.device.type == "cuda"
        self._busy_until = 0.0  # end of the last published batch (monotonic), so busy time is counted once
        self.telemetry = WorkerTelemetry(self, health, summary_s=summary_s)  # heartbeat, readiness, lag, summary line
        outages.register(PART)

    @property
    def max_batch(self) -> int:
        return self.batcher.max_batch

    @property
    def reload_s(self) -> float:
        """How often a profile's folders are looked at for changes (``reloader``)."""
        return self.reloader.reload_s

    def prepare_all(self) -> None:
        """Prepare every configured profile up front, so the first frames don't wait for it."""
        for profile in self.profiles.profiles():
            self._prepared(profile)

    def _prepared(self, profile: StreamProfile) -> PreparedProfile:
        """The profile prepared, again once its reference or calibration folder changed (``reloader``)."""
        return self.reloader.get(profile)

    def _prepare(self, profile: StreamProfile) -> PreparedProfile:
        """A fresh preparation, its references and calibration through the tower in the
        precision frames will go through."""
        with self.backbone.computing_in(self.compute_dtype):
            return PreparedProfile(profile, self.backbone, self.prompts, self.anchors, self.cache, self.precision)

    # ---- the loop ------------------------------------------------------------------------
    def run(self, stop: threading.Event, consumer=None, until_idle_s: float | None = None,
            until: Callable[[], bool] | None = None) -> WorkerStats:
        """Score until ``stop`` is set, or ``until()`` is true (asked between batches and after
        each empty poll), or, with ``until_idle_s``, nothing came for that long.

        On a GPU the loop is one batch deep: batch k's model work is queued on the device
        before batch k-1's scores are published and committed, so the host's per-frame work
        (messages, PNG maps, the bus) overlaps the device's instead of leaving it idle. A
        pending batch is published as soon as no further frame is waiting, so a scarce feed
        gets its scores as early as before. On a CPU, where the model runs on the host's own
        cores, each batch is published straight away.

        Run it on the process's main thread where you can: with OpenMP's intra-op threads, the
        same model on another thread measured 10-20 % slower here (README, Throughput)."""
        consumer = consumer or self.bus.consumer([self.source_topic], self.group)
        producer = self.bus.producer()
        pending: _Batch | None = None
        idle_since = time.monotonic()
        upkeep = self.anchors.keep_in_redis(stop)  # Redis back after an outage, or restarted empty: write them again
        try:
            while not stop.is_set() and not (until is not None and until()):
                waited = pending is None  # a busy poll takes what is there and does not wait
                records = self.batcher.gather(consumer, first=not self.stats.batches, busy=not waited)
                self.telemetry.tick(consumer)
                launched = self.launch(records) if records else None
                if pending is not None:
                    self.finish(pending, producer)
                    consumer.commit(pending.records)
                pending = None
                if launched is not None:
                    idle_since = time.monotonic()
                    if self.overlap:
                        pending = launched
                    else:
                        self.finish(launched, producer)
                        consumer.commit(launched.records)
                elif waited and until_idle_s is not None and time.monotonic() - idle_since > until_idle_s:
                    break
            if pending is not None:  # stopped with a batch in flight: its scores are computed, send them
                self._finish_at_stop(pending, producer, consumer)
        except StopRequested as err:  # stopped while the broker was down: the batch stays for the group
            log.warning("%s; the frames not committed are scored again by the group", err)
        finally:
            self.telemetry.stopped()
            upkeep.set()
            consumer.close()
            producer.close()
        return self.stats

    def _finish_at_stop(self, batch: "_Batch", producer, consumer) -> None:
        """Publish and commit a batch still in flight at a stop; when the bus is already gone
        (a part failed), it stays uncommitted and the group scores it again (at-least-once)."""
        try:
            self.finish(batch, producer)
            consumer.commit(batch.records)
        except (BusError, StopRequested) as err:
            log.warning("the batch in flight at the stop was not published (%s); the group scores it again", err)

    def handle(self, records: list[Record], producer) -> None:
        """Score ``records`` and publish (scores and dead letters), acknowledged on return."""
        self.finish(self.launch(records), producer)

    def launch(self, records: list[Record]) -> "_Batch":
        """Read, decode and queue the model on ``records``: on a GPU this returns once the work
        and the copies of its results to the host are queued. Unreadable frames are
        dead-lettered later, by ``finish``, with the batch's scores."""
        started, started_at = time.monotonic(), time.time()
        batch = _Batch(records, started, started_at)
        metrics.BATCH_SIZE.observe(len(records))
        readable: list[tuple[Record, FrameMeta]] = []
        for record in records:
            try:
                header = frame_header(record.headers)
            except MessageError as err:
                batch.dead.append((record, str(err), None))
                metrics.DEAD_LETTERS.labels("worker", "bad_header").inc()
                continue
            if isinstance(header, SessionEnd):
                batch.ends.append(header)
            else:
                readable.append((record, header))
        metrics.FRAMES_RECEIVED.inc(len(records) - len(batch.ends))  # frames only, not the ends of sessions
        if not readable:
            return batch
        images, kept, failed = self.decoder.decode([record.value for record, _ in readable])
        for index, reason in failed.items():
            batch.dead.append((readable[index][0], reason, readable[index][1]))
            metrics.DEAD_LETTERS.labels("worker", "undecodable_frame").inc()
        frames = [_Frame(*readable[index], row) for row, index in enumerate(kept)]
        batch.decode_s = time.monotonic() - started
        metrics.DECODE_SECONDS.observe(batch.decode_s)
        by_profile: dict[str, list[_Frame]] = {}
        for frame in frames:
            by_profile.setdefault(self.profiles.for_stream(frame.meta.stream).key(), []).append(frame)
        for members in by_profile.values():
            group = images if len(members) == len(frames) else images[[f.index for f in members]]
            self._launch_isolating(batch, members, group)
        return batch

    def _launch_isolating(self, batch: _Batch, frames: list[_Frame], images: torch.Tensor) -> None:
        """Queue the model on ``frames``; when it fails, on each frame alone, and dead-letter a
        frame it still fails on, unless it fails on a blank frame too (then it is broken: raise)."""
        try:
            batch.groups.append(self._launch_group(frames, images))
        except Exception as err:
            if len(frames) > 1:
                for row, frame in enumerate(frames):
                    self._launch_isolating(batch, [frame], images[row:row + 1])
                return
            if not self._model_works(frames[0], images):
                raise
            batch.dead.append((frames[0].record, f"scoring failed: {describe(err)}", frames[0].meta))

    def _model_works(self, frame: _Frame, images: torch.Tensor) -> bool:
        """Whether the frame's model scores a blank frame (the probe telling a poison frame
        from a broken model)."""
        prepared = self._prepared(self.profiles.for_stream(frame.meta.stream))
        try:
            with self.backbone.computing_in(self.compute_dtype):
                prepared.method.score(torch.zeros_like(images))
            return True
        except Exception as err:  # noqa: BLE001 - the answer is "no"
            log.error("the model fails on a blank frame too (%s): the fault is the worker's", describe(err))
            return False

    def _launch_group(self, frames: list[_Frame], images: torch.Tensor) -> "_Group":
        prepared = self._prepared(self.profiles.for_stream(frames[0].meta.stream))
        picked = time.time()
        clock = DeviceClock(self.backbone.device)
        with self.backbone.computing_in(self.compute_dtype):
            result = prepared.method.score(images)
        clock.stop()
        rows, maps = reduce_maps(result.anomaly_map, [(f.meta.width, f.meta.height) for f in frames])
        host, ready = to_host([result.image_score.float(), *maps])
        return _Group(frames, prepared, picked, clock, host[0], list(zip(rows, host[1:])), ready)

    def finish(self, batch: "_Batch", producer) -> None:
        """Publish the batch's scores and dead letters (waiting for the device where it must);
        acknowledged by the broker on return."""
        for record, reason, meta in batch.dead:
            self._dead_letter(record, reason, producer, meta)
        scored = sum(len(group.frames) for group in batch.groups)
        sent: list[tuple[_Frame, bytes]] = []
        for group in batch.groups:
            sent += self._publish(group, producer, batch.decode_s / max(scored, 1), batch.started_at)
        for end in batch.ends:  # after the scores: a session's scores all precede its end
            producer.send(self.results_topic, encode(end), key=end.stream.encode())
        try:
            producer.flush()  # raises BusError if the broker did not acknowledge: nothing is committed
        except RecordTooLarge:  # the broker's limit is below ours: find the scores it refused, one by one
            self._resend_each(sent, producer)
        self.stats.batches += 1
        self.stats.decode_s += batch.decode_s
        now = time.monotonic()
        self.stats.busy_s += now - max(batch.started, self._busy_until)
        self._busy_until = now

    def _resend_each(self, sent: list[tuple[_Frame, bytes]], producer) -> None:
        for frame, data in sent:
            try:
                producer.send(self.results_topic, data, key=frame.meta.stream.encode())
                producer.flush()
            except RecordTooLarge as err:
                self._dead_letter(frame.record, f"score message refused by the broker: {err}", producer, frame.meta)
                producer.flush()

    def _dead_letter(self, record: Record, reason: str, producer, meta: FrameMeta | None = None) -> None:
        self.stats.dead += 1
        log.warning("frame %s:%s@%s -> dead letter: %s", record.topic, record.partition, record.offset, reason)
        letter = DeadLetter.from_record(record, reason, "worker", stream=meta.stream if meta else None,
                                        seq=meta.seq if meta else None)
        producer.send(self.bus.topics.dead, letter.encoded(self.bus.max_message_bytes),
                      key=record.key[:1024] if record.key else None)

    def _publish(self, group: "_Group", producer, decode_share_s: float,
                 started_at: float) -> list[tuple[_Frame, bytes]]:
        """Send the group's scores; returns (frame, message bytes) of each score sent."""
        if group.ready is not None:
            group.ready.synchronize()
        model_s = group.clock.seconds()
        self.stats.model_s += model_s
        metrics.MODEL_SECONDS.observe(model_s)
        prepared, frames = group.prepared, group.frames
        scores = group.scores.tolist()
        maps: list[np.ndarray | None] = [None] * len(frames)
        for rows, reduced in group.maps:
            for row, anomaly_map in zip(rows, reduced.numpy()):
                maps[row] = anomaly_map
        sent = []
        for frame, value, anomaly_map in zip(frames, scores, maps):
            meta = frame.meta
            if not math.isfinite(value):  # no sink could read it; say so instead
                metrics.DEAD_LETTERS.labels("worker", "non_finite_score").inc()
                self._dead_letter(frame.record, f"the model gave a non-finite score ({value})", producer, meta)
                continue
            try:
                latency = Latency(queue_ms=max(0.0, (group.picked - meta.sent_at) * 1000),
                                  decode_ms=decode_share_s * 1000, model_ms=model_s * 1000 / len(frames),
                                  batch_size=len(frames))
                message = score_message(frame.record, meta, value, anomaly_map, prepared, self.worker_id, latency)
                data = encode_within(message, self.bus.max_message_bytes)
                producer.send(self.results_topic, data, key=meta.stream.encode())
            except (BusError, StopRequested) as err:
                if not isinstance(err, RecordTooLarge):
                    raise  # the bus itself failed: nothing of the batch is committed
                self._dead_letter(frame.record, f"score message too large: {err}", producer, meta)
                continue
            except Exception as err:  # noqa: BLE001 - one frame must not stop the worker
                self._dead_letter(frame.record, f"cannot publish its score: {describe(err)}", producer, meta)
                continue
            sent.append((frame, data))
            self.stats.frames += 1
            now = self.stats.last_score_at = time.time()
            self.stats.service_s.append(now - started_at)
            self.stats.end_to_end_s.append(now - meta.sent_at)
            metrics.FRAMES_SCORED.inc()
            metrics.QUEUE_SECONDS.observe(max(0.0, group.picked - meta.sent_at))
            metrics.END_TO_END_SECONDS.observe(max(0.0, now - meta.ts))
        return sent


@dataclass
class _Group:
    """One profile's frames of a batch, their model work queued; results land in ``scores``/``maps``."""
    frames: list[_Frame]
    prepared: PreparedProfile
    picked: float  # time.time() the batch went to the model
    clock: DeviceClock
    scores: torch.Tensor  # [B] on the host once ``ready``
    maps: list[tuple[list[int], torch.Tensor]]  # (rows, [n, h, w] on the host) per wire size
    ready: "torch.cuda.Event | None"  # None: already on the host


@dataclass
class _Batch:
    records: list[Record]
    started: float  # monotonic
    started_at: float  # time.time()
    decode_s: float = 0.0
    groups: list[_Group] = field(default_factory=list)
    dead: list[tuple[Record, str, FrameMeta | None]] = field(default_factory=list)
    ends: list[SessionEnd] = field(default_factory=list)  # forwarded after the scores
