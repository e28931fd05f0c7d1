"""The console's bus readers: the scores, frames and alerts topics, each read by one thread
outside any consumer group, so the console never holds the pipeline back (on the in-process
bus a group would keep records until it committed them) and never takes partitions from a sink.

- scores: from ``SCORES_BACK`` records before the end of each partition on (the recent
  timeline), into the live view, with the ends of sessions; flight-track points into the store;
- frames: from just before the end (only the newest frames make tiles; the offsets tell the
  live view where the topic ends, for the lag);
- alerts: from the start of what the topic keeps, each into the store (an upsert, so a restart
  reading them again changes nothing), with the score curve the live view holds around it.

A record that does not decode is skipped: the sinks dead-letter it, the console only shows.
"""

from __future__ import annotations

import logging
import threading

from ..bus import Bus, Record
from ..bus.messages import AlertMsg, MessageError, ScoreMsg, SessionEnd, decode, frame_header
from ..ops.health import HEALTH
from .live import LiveState
from .store import ConsoleStore, session_of

log = logging.getLogger(__name__)

SCORES_BACK = 5000  # per partition: the timelines' history when the console starts
FRAMES_BACK = 8
CURVE_PAD = 10  # frames of the curve kept before and after an event


class Readers:
    def __init__(self, bus: Bus, live: LiveState, store: ConsoleStore, stop: threading.Event):
        self.bus, self.live, self.store, self.stop = bus, live, store, stop
        self.drain = False  # set before ``stop``: read what is left before ending (a run's recorder)
        t = bus.topics
        self.threads = [threading.Thread(target=self._read, args=(t.scores, SCORES_BACK, self._scores),
                                         name="console-scores", daemon=True),
                        threading.Thread(target=self._read, args=(t.frames, FRAMES_BACK, self._frames),
                                         name="console-frames", daemon=True),
                        threading.Thread(target=self._read, args=(t.alerts, None, self._alerts),
                                         name="console-alerts", daemon=True)]
        self.ready = threading.Barrier(len(self.threads) + 1)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start reading; returns once every reader has its partitions and start offsets."""
        for thread in self.threads:
            thread.start()
        try:
            self.ready.wait(timeout_s)
        except threading.BrokenBarrierError:
            log.warning("console: a bus reader did not start in %.0f s", timeout_s)

    def join(self, timeout_s: float = 10.0) -> None:
        for thread in self.threads:
            if thread.ident is not None:
                thread.join(timeout_s)

    def _read(self, topic: str, back: int | None, handle) -> None:
        loop = f"console-{topic.rsplit('.', 1)[-1]}"
        try:
            consumer = self.bus.consumer([], None)
            partitions = consumer.partitions(topic)
            consumer.assign(topic, partitions)
            ends = consumer.end_offsets(topic) or {}
            for p in partitions:
                consumer.seek(topic, p, 0 if back is None else max(0, ends.get(p, 0) - back))
                if topic == self.bus.topics.frames:
                    self.live.frames_at(topic, p, ends.get(p, 0))
        finally:
            try:
                self.ready.wait(60)
            except threading.BrokenBarrierError:
                pass
        try:
            while not self.stop.is_set():
                records = consumer.poll(0.5, 256)
                HEALTH.beat(loop)
                if not records:
                    self.stop.wait(0.05)  # a closed in-process bus answers at once
                    continue
                try:
                    handle(records)
                except Exception as err:  # noqa: BLE001 - the console shows what it can; it never stops reading
                    log.warning("console: %s: %s: %s", topic, type(err).__name__, err)
            while self.drain and (records := consumer.poll(0.0, 256)):
                handle(records)
        finally:
            HEALTH.stop_beating(loop)
            consumer.close()

    def _scores(self, records: list[Record]) -> None:
        track = []
        for record in records:
            try:
                score = decode(record.value, ScoreMsg, SessionEnd)
            except MessageError:
                continue
            if isinstance(score, ScoreMsg):
                point = self.live.add_score(score)
                if point is not None:
                    track.append(point)
            else:
                self.live.end_session(score, record.timestamp_ms / 1000)
        self.store.add_track(track)

    def _frames(self, records: list[Record]) -> None:
        for record in records:
            self.live.frames_at(record.topic, record.partition, record.offset + 1)
            try:
                meta = frame_header(record.headers)
            except MessageError:
                continue
            if not isinstance(meta, SessionEnd) and record.value:
                self.live.add_frame(meta, record.value)

    def _alerts(self, records: list[Record]) -> None:
        for record in records:
            try:
                alert = decode(record.value, AlertMsg)
            except MessageError:
                continue
            curve = self.live.curve(alert.stream, session_of(alert), alert.start_seq - CURVE_PAD,
                                    alert.end_seq + CURVE_PAD)
            self.store.upsert_event(alert, curve)
        self.live.alert_arrived()
