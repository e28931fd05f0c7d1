"""The archive sink's consume loop (``linewatch sink archive`` and the embedded run); the alert
sink's is ``alert_sink``, what both use is ``plumbing``.

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
from ..bus.messages import MessageError, ScoreMsg, SessionEnd, decode
from ..bus.outages import OUTAGES, StopRequested, describe, retrying
from ..ops import metrics
from ..ops.health import HEALTH
from .archive import Archive, StoreUnavailable
from .plumbing import dead_letter, turn

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
            turn(ARCHIVE_PART, consumer)
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
        dead_letter(producer, bus, stats, reason, ARCHIVE_PART, record=record,
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
        dead_letter(producer, bus, stats, str(err), stage, record=record)
        return None
    if isinstance(score, ScoreMsg):
        stats.scores += 1
        metrics.SCORES_RECEIVED.labels(stage).inc()
    return score
