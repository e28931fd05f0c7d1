"""The sinks' consume loops (``linewatch sink alerts|archive`` and the embedded run).

Both read ``bus.topics.scores`` (or a replay's results ``topic``) in a consumer group, at least once: offsets are committed only
after the outputs (or the archive) have taken everything polled, so a crash redelivers and the
de-duplication downstream (tracker, JSONL, idempotent archive) makes that harmless. A record
that cannot be handled (not a ScoreMsg, undecodable image or map, an alert an output gave up
on) becomes a DeadLetter on ``bus.topics.dead`` and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from ..bus import Bus, Producer, Record
from ..bus.messages import (
    DEAD_PAYLOAD_LIMIT,
    AlertMsg,
    DeadLetter,
    MessageError,
    ScoreMsg,
    decode,
    encode,
    track,
)
from ..bus.outages import OUTAGES, StopRequested, describe, retrying
from .alerts import AlertOutput, AlertPolicy, AlertTracker, OutputError
from .archive import Archive, StoreUnavailable

log = logging.getLogger(__name__)

ARCHIVE_PART = "sink-archive"



@dataclass
class SinkStats:
    scores: int = 0  # score records decoded
    duplicates: int = 0  # scores ignored as already seen (alerts) — the archive rewrites instead
    late: int = 0  # scores that came after their seq had been given up on
    alerts: int = 0  # alerts raised by the tracker and handed to the outputs
    archived: int = 0  # anomalous frames archived
    dead: int = 0  # dead letters published


def run_alert_sink(bus: Bus, policy_for: Callable[[str], AlertPolicy], outputs: Iterable[AlertOutput], *,
                   group: str = "linewatch-alerts", stop: threading.Event, idle_flush_s: float = 5.0,
                   poll_s: float = 0.5, max_records: int = 64, topic: str | None = None) -> SinkStats:
    """Scores -> AlertTracker -> outputs, until ``stop`` is set; then open events are closed.
    A stream with no score for ``idle_flush_s`` is flushed (the end of a file closes its event)."""
    outputs, stats = list(outputs), SinkStats()
    tracker = AlertTracker(policy_for)
    consumer, producer = bus.consumer([topic or bus.topics.scores], group), bus.producer()
    held: list[Record] = []  # handled, not yet committed (a buffered score pins its partition)
    origin: dict[tuple[str, int], Record] = {}  # (track, seq) -> record, for buffered scores

    def deliver(alerts: list[AlertMsg]) -> None:
        for alert in alerts:
            for output in outputs:
                try:
                    output.write(alert)
                except OutputError as err:
                    log.warning("alert %s (%s) -> dead letter: %s", alert.event_id, alert.status, err)
                    _dead_letter(producer, bus, stats, f"{type(output).__name__}: {err}", "sink-alerts",
                                 payload=encode(alert), stream=alert.stream, seq=alert.end_seq)
            stats.alerts += 1

    def commit(everything: bool) -> None:
        nonlocal held
        for output in outputs:
            output.flush()
        producer.flush()  # dead letters acknowledged before their records are committed
        buffered = tracker.buffered()
        for key in [k for k in origin if k not in buffered]:
            del origin[key]
        floor: dict[tuple[str, int], int] = {}  # lowest offset per partition still needed
        if not everything:
            for record in origin.values():
                slot = (record.topic, record.partition)
                floor[slot] = min(floor.get(slot, record.offset), record.offset)
        ready = [r for r in held if r.offset < floor.get((r.topic, r.partition), r.offset + 1)]
        if ready:
            consumer.commit(ready)
        held = [r for r in held if r.offset >= floor.get((r.topic, r.partition), r.offset + 1)]

    try:
        while not stop.is_set():
            records = consumer.poll(poll_s, max_records)
            alerts: list[AlertMsg] = []
            for record in records:
                score = _decode_score(record, producer, bus, stats, "sink-alerts")
                if score is not None:
                    origin.setdefault((track(score.frame), score.frame.seq), record)
                    alerts += tracker.push(score)
            alerts += tracker.flush_idle(idle_flush_s)
            deliver(alerts)
            held += records
            commit(everything=False)
        deliver(tracker.flush())
        commit(everything=True)
    finally:
        stats.duplicates, stats.late = tracker.duplicates, tracker.late
        for output in outputs:
            output.close()
        consumer.close()
    return stats


def run_archive_sink(bus: Bus, archive: Archive, *, group: str = "linewatch-archive", stop: threading.Event,
                     poll_s: float = 0.5, max_records: int = 64, topic: str | None = None) -> SinkStats:
    """Scores -> Archive (anomalous frames only), until ``stop`` is set. Any failure of one
    record dead-letters it; a store outage (S3, the disk) is waited out, the records behind it
    kept; a stop meanwhile commits only the records before it."""
    stats = SinkStats()
    OUTAGES.register(ARCHIVE_PART)
    consumer, producer = bus.consumer([topic or bus.topics.scores], group), bus.producer()
    try:
        while not stop.is_set():
            records = consumer.poll(poll_s, max_records)
            done: list[Record] = []
            try:
                for record in records:
                    _archive_one(record, archive, producer, bus, stats, stop)
                    done.append(record)
            finally:  # a stop during an outage still commits what was archived before it
                if done:
                    producer.flush()
                    consumer.commit(done)
    except StopRequested as err:
        log.warning("%s; the records not archived are read again at the next start", err)
    finally:
        archive.close()
        consumer.close()
        producer.close()
    return stats


def _archive_one(record: Record, archive: Archive, producer: Producer, bus: Bus, stats: SinkStats,
                 stop: threading.Event) -> None:
    score = None
    try:
        score = _decode_score(record, producer, bus, stats, ARCHIVE_PART)
        if score is None:
            return
        row = retrying(lambda: archive.add(score), part=ARCHIVE_PART, dependency=archive.store_name,
                       transient=(StoreUnavailable,), stop=stop)
    except StopRequested:
        raise
    except Exception as err:  # noqa: BLE001 - whatever this record causes, the next one goes on
        reason = str(err) if isinstance(err, ValueError) else f"cannot archive: {describe(err)}"
        _dead_letter(producer, bus, stats, reason, ARCHIVE_PART, record=record,
                     stream=score.frame.stream if score else None, seq=score.frame.seq if score else None)
        return
    stats.archived += row is not None


def _decode_score(record: Record, producer: Producer, bus: Bus, stats: SinkStats, stage: str) -> ScoreMsg | None:
    try:
        score = decode(record.value, ScoreMsg)
    except MessageError as err:
        _dead_letter(producer, bus, stats, str(err), stage, record=record)
        return None
    stats.scores += 1
    return score


def _dead_letter(producer: Producer, bus: Bus, stats: SinkStats, reason: str, stage: str, *,
                 record: Record | None = None, payload: bytes | None = None, stream: str | None = None,
                 seq: int | None = None) -> None:
    if record is not None:
        log.warning("%s:%s@%s -> dead letter: %s", record.topic, record.partition, record.offset, reason)
        letter = DeadLetter.from_record(record, reason, stage, stream=stream, seq=seq)
    else:
        letter = DeadLetter(reason=reason, stage=stage, stream=stream, seq=seq,
                            payload=(payload or b"")[:DEAD_PAYLOAD_LIMIT])
    producer.send(bus.topics.dead, letter.encoded(bus.max_message_bytes),
                  key=letter.stream.encode()[:1024] if letter.stream is not None else None)
    stats.dead += 1
