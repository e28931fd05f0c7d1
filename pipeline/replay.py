"""`linewatch replay`: re-score frames still on the frames topic into a separate results topic.

A range is an offset range (per partition) or a time range over when frames were
published (the Kafka record time; for live sources that is capture time plus the ingest
latency, for files the moment they were ingested). Time ranges are found by seeking: a
binary search over offsets on record times, which only grow within a partition, because
Tansu's ``offsets_for_times`` always answers 0. Each partition is assigned on its own
while it is searched and read, so records of other partitions never confuse the search.

The end of a session (``SessionEnd``) inside the range goes through with the frames; a
session the range cuts short gets one at the end of the replay, so an alert sink on the
results topic closes its events.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass

from tqdm import tqdm

from ..bus import Bus, Consumer, Record
from ..bus.messages import FrameMeta, MessageError, SessionEnd, encode, frame_header
from ..workers.worker import ScoringWorker

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0  # an empty poll this long means "past the end of the partition"


@dataclass
class ReplayRange:
    from_offset: int | None = None
    to_offset: int | None = None  # exclusive
    since: float | None = None  # UNIX seconds, inclusive
    until: float | None = None  # exclusive
    streams: str = "*"  # glob over stream ids

    def __post_init__(self):
        if (self.from_offset is not None or self.to_offset is not None) and (self.since is not None or
                                                                             self.until is not None):
            raise ValueError("give an offset range or a time range, not both")
        if self.from_offset is not None and self.to_offset is not None and self.to_offset <= self.from_offset:
            raise ValueError(f"--to-offset {self.to_offset} must be above --from-offset {self.from_offset}")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ValueError("--until must be after --since")


def record_at(consumer: Consumer, topic: str, partition: int, offset: int) -> Record | None:
    consumer.seek(topic, partition, offset)
    records = [r for r in consumer.poll(PROBE_TIMEOUT_S, 1) if r.partition == partition]
    return records[0] if records else None


def first_offset_at(consumer: Consumer, topic: str, partition: int, ts_ms: int) -> int | None:
    """Lowest offset whose timestamp is >= ts_ms, or None when every record is older."""
    first = record_at(consumer, topic, partition, 0)
    if first is None:
        return None
    start = first.offset  # the log may begin above 0 after retention
    if first.timestamp_ms >= ts_ms:
        return start
    lo, step = start, 1  # invariant: record at lo is older than ts_ms
    while True:  # gallop until a record is new enough or the end is passed
        probe = record_at(consumer, topic, partition, lo + step)
        if probe is not None and probe.timestamp_ms < ts_ms:
            lo, step = probe.offset, step * 2
            continue
        hi = lo + step  # the answer is in (lo, hi]
        break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probe = record_at(consumer, topic, partition, mid)
        if probe is not None and probe.timestamp_ms < ts_ms:
            lo = probe.offset
        else:
            hi = mid
    return hi if record_at(consumer, topic, partition, hi) is not None else None


def replay(bus: Bus, worker: ScoringWorker, span: ReplayRange, progress: bool = True) -> dict:
    topic = bus.topics.frames
    consumer = bus.consumer([], None)
    producer = bus.producer()
    counts = {"read": 0, "scored": 0, "skipped": 0, "partitions": 0}
    sessions: dict[tuple[str, str], FrameMeta | None] = {}  # the last frame of each session replayed; None: ended
    try:
        partitions = consumer.partitions(topic)
        with tqdm(desc="replay", unit="frame", disable=not progress) as bar:
            for partition in partitions:
                consumer.assign(topic, [partition])
                start = span.from_offset or 0
                if span.since is not None:
                    start = first_offset_at(consumer, topic, partition, int(span.since * 1000))
                    if start is None:
                        continue
                counts["partitions"] += 1
                for batch in _read(consumer, topic, partition, start, span, worker.max_batch, counts):
                    worker.handle(batch, producer)
                    ends = _note_sessions(batch, sessions)
                    counts["scored"] += len(batch) - ends
                    bar.update(len(batch) - ends)
        for last in sessions.values():
            if last is not None:  # cut short by the range
                end = SessionEnd(stream=last.stream, session=last.session, frames=last.seq + 1, ts=last.ts,
                                 reason="replay")
                producer.send(worker.results_topic, encode(end), key=last.stream.encode())
        producer.flush()
    finally:
        consumer.close()
        producer.close()
    return counts


def _note_sessions(batch: list[Record], sessions: dict) -> int:
    """Note each session's last frame, or its end; returns how many ends the batch held."""
    ends = 0
    for record in batch:
        try:
            header = frame_header(record.headers)
        except MessageError:
            continue  # the worker dead-lettered it
        key = (header.stream, header.session)
        if isinstance(header, SessionEnd):
            sessions[key] = None
            ends += 1
        elif key not in sessions or (sessions[key] is not None and header.seq > sessions[key].seq):
            sessions[key] = header
    return ends


def _read(consumer: Consumer, topic: str, partition: int, start: int, span: ReplayRange, batch_size: int,
          counts: dict):
    consumer.seek(topic, partition, start)
    batch: list[Record] = []
    last_data = time.monotonic()
    while True:
        records = [r for r in consumer.poll(0.5, batch_size) if r.partition == partition]
        if not records:
            if time.monotonic() - last_data > 2 * PROBE_TIMEOUT_S:
                break  # end of the partition (Tansu's end offsets are unreliable, so we listen)
            continue
        last_data = time.monotonic()
        done = False
        for record in records:
            if span.to_offset is not None and record.offset >= span.to_offset:
                done = True
                break
            if span.until is not None and record.timestamp_ms >= span.until * 1000:
                done = True  # record times only grow: nothing later falls inside
                break
            counts["read"] += 1
            if span.streams != "*":
                try:
                    stream = frame_header(record.headers).stream
                except MessageError:
                    stream = None  # the worker dead-letters it with the reason
                if stream is not None and not fnmatch.fnmatchcase(stream, span.streams):
                    counts["skipped"] += 1
                    continue
            if span.since is not None and record.timestamp_ms < span.since * 1000:
                counts["skipped"] += 1
                continue
            batch.append(record)
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if done:
            break
    if batch:
        yield batch
