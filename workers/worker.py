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
import torch.nn.functional as F

from ..bus import Bus, BusError, Record, RecordTooLarge, record_size
from ..bus.jpeg import DEFAULT_MAX_PIXELS, shrink_jpeg
from ..bus.maps import MAP_MAX_SIDE, encode_map
from ..bus.messages import (
    DeadLetter,
    FrameMeta,
    FrameRef,
    Latency,
    MessageError,
    ScoreMsg,
    SessionEnd,
    encode,
    frame_header,
)
from ..bus.outages import OUTAGES, StopRequested, describe
from ..ops import metrics
from ..scoring.backbone import Backbone
from ..scoring.precision import autocast_dtype, resolve_precision
from ..scoring.prompts import PromptPack
from .anchors import AnchorCache
from .frames import FrameDecoder
from .prepared import PreparedProfile, folder_signature
from .prepared_cache import PreparedCache
from .profiles import ProfileTable
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
                 max_pixels: int = DEFAULT_MAX_PIXELS, reload_s: float = 5.0, cache: PreparedCache | None = None):
        """``cache``: reference memories and thresholds kept across starts (``prepared_cache``)."""
        self.bus, self.backbone, self.profiles, self.anchors = bus, backbone, profiles, anchors
        self.cache = cache
        self.prompts = prompts or PromptPack.load()
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.precision = resolve_precision(precision, backbone.device)
        self.compute_dtype = autocast_dtype(self.precision)
        self.decoder = FrameDecoder(backbone.image_size, backbone.device, max_pixels=max_pixels)
        self.group = group or bus.topics.group("workers")
        self.source_topic = source_topic or bus.topics.frames
        self.results_topic = results_topic or bus.topics.scores
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.prepared: dict[str, PreparedProfile] = {}
        self.reload_s, self._reload_at = reload_s, {}  # see _prepared: changed reference folders
        self.stats = WorkerStats()
        # one batch in flight while the previous one is published (see ``run``): pays where the
        # model runs asynchronously on a GPU; on a CPU it would only delay each batch's scores
        self.overlap = backbone.device.type == "cuda"
        self._busy_until = 0.0  # end of the last published batch (monotonic), so busy time is counted once
        self.telemetry = WorkerTelemetry(self, summary_s=summary_s)  # heartbeat, readiness, lag, summary line
        OUTAGES.register(PART)

    def prepare_all(self) -> None:
        """Prepare every configured profile up front, so the first frames don't wait for it."""
        for profile in self.profiles.profiles():
            self._prepared(profile)

    def _prepared(self, profile) -> PreparedProfile:
        key = profile.key()
        current = self.prepared.get(key)
        if current is None or (self._reload_due(key) and current.stale()):
            try:  # references and calibration go through the tower in the precision frames will
                with self.backbone.computing_in(self.compute_dtype):
                    self.prepared[key] = PreparedProfile(profile, self.backbone, self.prompts, self.anchors,
                                                         self.cache, self.precision)
            except (ValueError, OSError) as err:  # a folder changed under us: keep scoring with what was there
                if current is None:
                    raise
                current.signature = folder_signature(profile)  # tried again at the next change
                log.warning("profile %s/%s: its folders changed but cannot be read (%s); keeping the previous "
                            "references and threshold", profile.method, profile.class_name, err)
            else:
                if current is not None:
                    log.info("profile %s/%s re-prepared: its reference or calibration folder changed",
                             profile.method, profile.class_name)
        return self.prepared[key]

    def _reload_due(self, key: str) -> bool:
        """At most every ``reload_s`` per profile (0: every time) the folders are looked at."""
        now = time.monotonic()
        if now - self._reload_at.get(key, 0.0) < self.reload_s:
            return False
        self._reload_at[key] = now
        return True

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
                records = self._gather(consumer, busy=not waited)
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

    def _gather(self, consumer, busy: bool = False) -> list[Record]:
        """Up to ``max_batch`` records, waiting at most ``max_wait_ms`` after the first for company.
        ``busy`` (a batch is in flight on the device): take what is there now; nothing waiting
        means the pending batch is published first."""
        size = self.max_batch if self.stats.batches else 1  # the first: one frame, its score at once
        records = consumer.poll(0.0 if busy else 0.5, size)
        deadline = time.monotonic() + self.max_wait_s
        while records and len(records) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = consumer.poll(left, size - len(records))
            if not more:
                break
            records += more
        return records

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
        clock = _DeviceClock(self.backbone.device)
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
            anomalous = value >= prepared.threshold
            try:
                message = ScoreMsg(
                    frame=meta, frame_ref=FrameRef(topic=frame.record.topic, partition=frame.record.partition,
                                                   offset=frame.record.offset),
                    image_score=value, threshold=prepared.threshold, anomalous=anomalous,
                    map=encode_map(anomaly_map), method=prepared.profile.method,
                    class_name=prepared.profile.class_name, anchor_key=prepared.anchor_key,
                    model=prepared.model, worker=self.worker_id,
                    latency=Latency(queue_ms=max(0.0, (group.picked - meta.sent_at) * 1000),
                                    decode_ms=decode_share_s * 1000, model_ms=model_s * 1000 / len(frames),
                                    batch_size=len(frames)),
                    frame_jpeg=frame.record.value if anomalous else None)
                data = self._fit(message)
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

    def _fit(self, message: ScoreMsg) -> bytes:
        """The score's bytes, within the bus's message size: an anomalous frame too large to
        travel whole is re-encoded smaller (``frame_jpeg_note="reduced"``) or left out
        (``"dropped"``); RecordTooLarge if even that does not fit."""
        data, key = encode(message), message.frame.stream.encode()
        limit = self.bus.max_message_bytes
        if record_size(data, key) <= limit or message.frame_jpeg is None:
            return data
        bare = encode(message.model_copy(update={"frame_jpeg": None, "frame_jpeg_note": "dropped"}))
        room = (limit - record_size(bare, key) - 64) * 3 // 4  # base64 inflates the JPEG by 4/3
        smaller = shrink_jpeg(message.frame_jpeg, room) if room > 0 else None
        log.warning("frame %s seq %d: its score with the %d-byte frame exceeds the %d-byte message limit; "
                    "sending it %s", message.frame.stream, message.frame.seq, len(message.frame_jpeg), limit,
                    "with the frame re-encoded smaller" if smaller else "without the frame")
        if smaller is None:
            return bare
        return encode(message.model_copy(update={"frame_jpeg": smaller, "frame_jpeg_note": "reduced"}))


@dataclass
class _Group:
    """One profile's frames of a batch, their model work queued; results land in ``scores``/``maps``."""
    frames: list[_Frame]
    prepared: PreparedProfile
    picked: float  # time.time() the batch went to the model
    clock: "_DeviceClock"
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


class _DeviceClock:
    """The model's time on its device: CUDA events around the queued work (read once it has run),
    wall time on a CPU (where the work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.current_stream(device)  # the model's device, not the process's current one
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record(self.stream)
        else:
            self.began, self.elapsed = time.monotonic(), 0.0

    def stop(self) -> None:
        if self.cuda:
            self.end.record(self.stream)
        else:
            self.elapsed = time.monotonic() - self.began

    def seconds(self) -> float:
        """After the work has run (``end`` reached on CUDA)."""
        return self.begin.elapsed_time(self.end) / 1000.0 if self.cuda else self.elapsed


def to_host(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], "torch.cuda.Event | None"]:
    """Copies of ``tensors`` in host memory. From a GPU they are queued into pinned buffers
    without blocking, and the returned event marks them done: a later batch's kernels, queued
    behind them, do not delay them."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors], None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors):
        target.copy_(source, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensors[0].device))  # the copies' stream, on their device
    return host, ready


def reduce_maps(maps: torch.Tensor, frame_sizes: list[tuple[int, int]],
                max_side: int = MAP_MAX_SIDE) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The model's square maps ``[B, S, S]`` as the messages carry them, still on their device:
    each at its frame's (width, height) aspect (the model saw a squashed square), long side at
    most ``max_side``, area-averaged, NaN and infinities as 0. Returns the batch rows and the
    ``[n, h, w]`` maps of each wire size. On a GPU a few KB per frame then cross to the host
    instead of the whole map (1 MB at 518 px), and the host does no per-frame resizing."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    side = maps.shape[-1]
    rows_by_size: dict[tuple[int, int], list[int]] = {}
    for row, (width, height) in enumerate(frame_sizes):
        rows_by_size.setdefault(_wire_size(side, width, height, max_side), []).append(row)
    rows, reduced = [], []
    for size, members in rows_by_size.items():
        group = maps if len(members) == len(frame_sizes) else maps[members]
        rows.append(members)
        reduced.append(F.interpolate(group[:, None], size=size, mode="area")[:, 0])
    return rows, reduced


def wire_maps(maps: torch.Tensor, frame_sizes: list[tuple[int, int]], max_side: int = MAP_MAX_SIDE) -> list[np.ndarray]:
    """``reduce_maps``, on the host, one array per frame in batch order."""
    out: list[np.ndarray | None] = [None] * len(frame_sizes)
    for members, reduced in zip(*reduce_maps(maps, frame_sizes, max_side)):
        for row, anomaly_map in zip(members, reduced.cpu().numpy()):
            out[row] = anomaly_map
    return out


def _wire_size(side: int, width: int, height: int, max_side: int) -> tuple[int, int]:
    """(rows, cols) of a ``side``-square map at a width x height frame's aspect, long side <= max_side."""
    long = min(side, max_side)
    if width >= height:
        return max(1, round(long * height / width)), long
    return long, max(1, round(long * width / height))
