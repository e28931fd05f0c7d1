"""The archive sink's consume loop (``linewatch sink archive`` and the embedded run), and the
dead-letter helpers both sinks use (the alert sink's loop is ``alert_sink``).

Both sinks read ``bus.topics.scores`` (or a replay's results ``topic``) in a consumer group, at least once: offsets are committed only
after the outputs (or the archive) have taken everything polled, so a crash redelivers and the
de-duplication downstream (tracker, JSONL, idempotent archive) makes that harmless. A record
that cannot be handled (not a ScoreMsg, undecodable image or map, an alert an output gave up
on) becomes a DeadLetter on ``bus.topics.dead`` and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..bus import Bus, Producer, Record
from ..bus.messages import (
    DEAD_PAYLOAD_LIMIT,
    DeadLetter,
    MessageError,
    ScoreMsg,
    SessionEnd,
    decode,
)
from ..bus.outages import OUTAGES, StopRequested, describe, retrying
from ..ops import metrics
from ..ops.health import HEALTH
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


def run_archive_sink(bus: Bus, archive: Archive, *, group: str | None = None, stop: threading.Event,
                     poll_s: float = 0.5, max_records: int = 64, topic: str | None = None) -> SinkStats:
    """Scores -> Archive (anomalous frames only), until ``stop`` is set. Any failure of one
    record dead-letters it; a store outage (S3, the disk) is waited out, the records behind it
    kept; a stop meanwhile commits only the records before it."""
    stats = SinkStats()
    OUTAGES.register(ARCHIVE_PART)
    consumer, producer = bus.consumer([topic or bus.topics.scores], group or bus.topics.group("archive")), bus.producer()
    try:
        while not stop.is_set():
            records = consumer.poll(poll_s, max_records)
            _turn(ARCHIVE_PART, consumer)
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
        HEALTH.stop_beating(ARCHIVE_PART)
        archive.close()
        consumer.close()
        producer.close()
    return stats


def _archive_one(record: Record, archive: Archive, producer: Producer, bus: Bus, stats: SinkStats,
                 stop: threading.Event) -> None:
    score = None
    try:
        score = _decode_score(record, producer, bus, stats, ARCHIVE_PART)
        if score is None or isinstance(score, SessionEnd):  # nothing to archive at a session's end
            return
        row = retrying(lambda: archive.add(score), part=ARCHIVE_PART, dependency=archive.store_name,
                       transient=(StoreUnavailable,), stop=stop)
    except StopRequested:
        raise
    except Exception as err:  # noqa: BLE001 - whatever this record causes, the next one goes on
        reason = str(err) if isinstance(err, ValueError) else f"cannot archive: {describe(err)}"
        metrics.DEAD_LETTERS.labels(ARCHIVE_PART, "archive_error").inc()
        _dead_letter(producer, bus, stats, reason, ARCHIVE_PART, record=record,
                     stream=score.frame.stream if score else None, seq=score.frame.seq if score else None)
        return
    if row is not None:
        stats.archived += 1
        metrics.ARCHIVE_WRITES.inc()


def _decode_score(record: Record, producer: Producer, bus: Bus, stats: SinkStats,
                  stage: str) -> ScoreMsg | SessionEnd | None:
    try:
        score = decode(record.value, ScoreMsg, SessionEnd)
    except MessageError as err:
        metrics.DEAD_LETTERS.labels(stage, "bad_score").inc()
        _dead_letter(producer, bus, stats, str(err), stage, record=record)
        return None
    if isinstance(score, ScoreMsg):
        stats.scores += 1
        metrics.SCORES_RECEIVED.labels(stage).inc()
    return score


def _turn(loop: str, consumer) -> None:
    """Once per loop turn: the heartbeat /healthz checks, and readiness (the group's assignment)."""
    HEALTH.beat(loop)
    assigned = consumer.assigned()
    HEALTH.set("assignment", assigned, "partitions assigned by the group" if assigned
               else "waiting for the group to assign partitions")


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
