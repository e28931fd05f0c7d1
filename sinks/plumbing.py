"""What both sinks' loops use: a loop turn's health beat and readiness, and dead letters."""

from __future__ import annotations

import logging

from ..bus import Bus, Producer, Record
from ..bus.messages import DEAD_PAYLOAD_LIMIT, DeadLetter
from ..ops.health import HEALTH

log = logging.getLogger(__name__)


def turn(loop: str, consumer) -> None:
    """Once per loop turn: the heartbeat /healthz checks, and readiness (the group's assignment)."""
    HEALTH.beat(loop)
    assigned = consumer.assigned()
    HEALTH.set("assignment", assigned, "partitions assigned by the group" if assigned
               else "waiting for the group to assign partitions")


def dead_letter(producer: Producer, bus: Bus, stats, reason: str, stage: str, *,
                 record: Record | None = None, payload: bytes | None = None, stream: str | None = None,
                 seq: int | None = None) -> None:
    """Publish a DeadLetter with ``reason`` (of ``record``, or of ``payload``) and count it in ``stats.dead``."""
    if record is not None:
        log.warning("%s:%s@%s -> dead letter: %s", record.topic, record.partition, record.offset, reason)
        letter = DeadLetter.from_record(record, reason, stage, stream=stream, seq=seq)
    else:
        letter = DeadLetter(reason=reason, stage=stage, stream=stream, seq=seq,
                            payload=(payload or b"")[:DEAD_PAYLOAD_LIMIT])
    producer.send(bus.topics.dead, letter.encoded(bus.max_message_bytes),
                  key=letter.stream.encode()[:1024] if letter.stream is not None else None)
    stats.dead += 1
