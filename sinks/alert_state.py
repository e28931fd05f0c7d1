"""The alert sink's state on the bus: a compacted changelog topic per scores topic and group.

Why a changelog topic (Kafka Streams' pattern) and not a local store whose position rides
with the offsets: the state must follow a partition to whichever sink instance owns it. A
second instance on another machine that takes over partitions, or a restarted pod on a new
node, finds the state on the broker; a local file would be out of its reach. The topic is
created compacted, so Kafka keeps the last record per key; Tansu compacts nothing and has no
transactions, so the reader keeps the last record per key itself and the write order below
(not a transaction) makes state and offsets agree. It works the same on the in-process bus.

Records (key -> JSON value), each on the partition of the scores topic its stream is read
from, so a new owner of a partition reads exactly that partition of this topic:

- ``state/<stream>/<epoch>``: the stream's ``StreamState`` (per session: watermark, reorder
  buffer, recent window, open event, last capture time, ended), written by the owner of that
  epoch (below);
- ``pending/topic/<status>/<event_id>``: an alert raised and not yet acknowledged on the
  alerts topic; a tombstone once it is (a sink before the alert channels read that topic
  kept one per output: restored the same way, republished once);
- ``fence/<token>``: written by each new owner of a partition before it reads it back.

Write-ahead, then commit. At a checkpoint the sink writes the changed states and the new
alerts' pending records and waits for the broker to acknowledge them; only then does it
publish the alerts to the alerts topic, tombstone their pending records and commit the
offsets. Killed before the acknowledgement, the next owner redoes the records from the last
commit as if new; killed after it, the state is a little ahead of the offsets and the redone
records are duplicates the tracker ignores. No event is re-raised under a new id and none is
left open; a pending alert is published by whoever owns its stream next. One killed between
publishing and the tombstone is published once more, the same message: the channels skip it
(the JSONL file knows its lines, a webhook receives the same ``Idempotency-Key``).

Zombie fencing: a sink that lost a partition without knowing it yet (frozen, cut off) may
still write to it. Every record carries its writer's epoch, the offset of the fence the
writer wrote when it took the partition; a reader ignores a record whose epoch is below the
latest fence before it. Fences have unique keys, so compaction never removes one, and the
epoch is part of a state record's key, so a zombie's late state can never take the place of
the owner's under compaction: a new owner writes each state it restored again under its own
epoch and deletes the earlier owners' records.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..bus import Bus, BusError, Record
from ..bus.messages import AlertMsg
from .events import StreamState

log = logging.getLogger(__name__)

STATE, PENDING, FENCE = "state/", "pending/", "fence/"
TOPIC = "topic"  # the pending records' output: the alerts topic


@dataclass(frozen=True)
class Parcel:
    """An alert and the partition of the scores topic it was raised on (its changelog partition)."""

    alert: AlertMsg
    partition: int


def state_topic(scores_topic: str, group: str) -> str:
    """The changelog of the alert sink ``group`` reading ``scores_topic``."""
    return f"{scores_topic}.{group}.state"


class _Stored(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1
    epoch: int  # the writer's: the offset of its fence


class StoredState(_Stored):
    state: StreamState


class StoredPending(_Stored):
    output: str
    alert: AlertMsg


def state_key(stream: str, epoch: int) -> bytes:
    return f"{STATE}{stream}/{epoch}".encode()


def pending_key(output: str, alert: AlertMsg) -> bytes:
    return f"{PENDING}{output}/{alert.status}/{alert.event_id}".encode()


@dataclass
class Restored:
    states: list[StreamState] = field(default_factory=list)
    pending: list[tuple[str, Parcel]] = field(default_factory=list)  # (output, parcel), in the order raised
    corrupt: list[tuple[Record, str]] = field(default_factory=list)  # records that do not parse, and why


class AlertStore:
    """Reads and writes the changelog ``topic`` (see the module docstring)."""

    def __init__(self, bus: Bus, topic: str, partitions: int, restore_timeout_s: float = 120.0):
        self.topic, self.restore_timeout_s = topic, restore_timeout_s
        bus.ensure_topics([topic], partitions=partitions, compact=True)
        self.reader = bus.consumer([], None)
        found = len(self.reader.partitions(topic))
        if found < partitions:
            raise BusError(f"the alert state topic {topic} has {found} partition(s), the scores topic {partitions}: "
                           f"delete it (the sink then starts without state) or give it {partitions}")
        self.producer = bus.producer()
        self.lock = threading.Lock()
        self.epochs: dict[int, int] = {}

    def restore(self, partitions: set[int]) -> Restored:
        """Take these partitions: fence them, then read each back up to the fence."""
        tokens = {p: secrets.token_hex(8) for p in partitions}
        with self.lock:
            for partition, token in tokens.items():
                self.producer.send(self.topic, b"{}", key=f"{FENCE}{token}".encode(), partition=partition)
            self.producer.flush()
        self.reader.assign(self.topic, sorted(partitions))
        for partition in partitions:
            self.reader.seek(self.topic, partition, 0)
        fence = {p: -1 for p in partitions}  # offset of the latest fence read
        latest: dict[tuple[int, bytes], tuple[int, _Stored | None]] = {}  # (partition, key) -> (offset, record)
        restored, reading = Restored(), set(partitions)
        deadline = time.monotonic() + self.restore_timeout_s
        while reading:
            if time.monotonic() > deadline:
                raise BusError(f"reading the alert state back from {self.topic} took over {self.restore_timeout_s:.0f} s")
            for record in self.reader.poll(0.5, 1000):
                p, key = record.partition, record.key or b""
                if p not in reading:
                    continue
                if key.startswith(FENCE.encode()):
                    fence[p] = record.offset
                    if key == f"{FENCE}{tokens[p]}".encode():
                        reading.discard(p)
                        self.epochs[p] = record.offset
                    continue
                if record.value is None:
                    latest[(p, key)] = (record.offset, None)
                    continue
                try:
                    stored = (StoredState if key.startswith(STATE.encode()) else StoredPending).model_validate_json(
                        record.value)
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(part) for part in first["loc"]) or "record"
                    restored.corrupt.append((record, f"alert state record {key!r} does not parse: {where}: {first['msg']}"))
                    continue
                if stored.epoch >= fence[p]:  # else a zombie's: written after a newer owner took over
                    latest[(p, key)] = (record.offset, stored)
        best: dict[str, tuple[int, int, StreamState]] = {}  # stream -> (epoch, offset, state)
        superseded: list[tuple[int, bytes]] = []  # state records of earlier owners, deleted once re-owned
        for (partition, key), (offset, stored) in sorted(latest.items(), key=lambda item: item[1][0]):
            if isinstance(stored, StoredState):
                superseded.append((partition, key))
                stream = stored.state.stream
                if stream not in best or (stored.epoch, offset) > best[stream][:2]:
                    best[stream] = (stored.epoch, offset, stored.state.model_copy(update={"partition": partition}))
            elif isinstance(stored, StoredPending):
                restored.pending.append((stored.output, Parcel(stored.alert, partition)))
        restored.states = [state for _, _, state in best.values()]
        # re-owned: each state written again under this owner's epoch, the earlier records deleted
        keep = {(state.partition, state_key(state.stream, self.epochs[state.partition])) for state in restored.states}
        self.write(restored.states, [])
        with self.lock:
            for partition, key in superseded:
                if (partition, key) not in keep:
                    self.producer.send(self.topic, None, key=key, partition=partition)
            self.producer.flush()
        return restored

    def write(self, states: list[StreamState], pending: list[tuple[str, Parcel]]) -> None:
        """Changed states and new pending alerts, acknowledged by the broker on return."""
        with self.lock:
            for state in states:
                value = StoredState(epoch=self.epochs[state.partition], state=state)
                self.producer.send(self.topic, value.model_dump_json().encode(),
                                   key=state_key(state.stream, value.epoch), partition=state.partition)
            for output, parcel in pending:
                value = StoredPending(epoch=self.epochs[parcel.partition], output=output, alert=parcel.alert)
                self.producer.send(self.topic, value.model_dump_json().encode(), key=pending_key(output, parcel.alert),
                                   partition=parcel.partition)
            self.producer.flush()

    def settle(self, pending: list[tuple[str, Parcel]]) -> None:
        """These alerts are on the alerts topic: tombstone their pending records."""
        with self.lock:
            for output, parcel in pending:
                self.producer.send(self.topic, None, key=pending_key(output, parcel.alert), partition=parcel.partition)
            self.producer.flush()

    def close(self) -> None:
        self.reader.close()
        self.producer.close()
