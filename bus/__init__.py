"""The wire: the bus interface with its in-process and Kafka implementations, the message
schema (``messages``) and the anomaly-map encoding (``maps``). Imports nothing of linewatch's.

One small interface, two implementations:

- ``memory://`` — in-process, the embedded default (``linewatch run``): partitioned logs in
  memory with consumer groups and committed offsets, bounded so a fast producer waits for
  its consumers instead of filling memory; consumed records are dropped.
- ``kafka://host:port[,host:port]`` (or bare ``host:port``) — Kafka through kafka-python,
  acks=all. Partitions and consumer groups are how linewatch scales.

Both carry the same records (key, value bytes, headers), so the embedded pipeline exercises
the same wire format as the distributed one.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass


class BusError(RuntimeError):
    """The bus cannot do what was asked (broker unreachable, send not acknowledged, ...)."""


class RecordTooLarge(BusError):
    """One record is larger than the bus takes (``Bus.max_message_bytes``): the caller shrinks
    or dead-letters it; the bus and the other records are fine."""


MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a 4K JPEG at high quality stays far below this


@dataclass(frozen=True)
class Record:
    topic: str
    value: bytes | None  # None: a tombstone on a compacted topic (the key is deleted)
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int = 0
    offset: int = -1
    timestamp_ms: int = 0


@dataclass(frozen=True)
class Topics:
    """Topic names, all under one configurable prefix."""

    prefix: str = "linewatch"

    @property
    def frames(self) -> str:
        return f"{self.prefix}.frames"

    @property
    def scores(self) -> str:
        return f"{self.prefix}.scores"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead-letter"

    def all(self) -> list[str]:
        return [self.frames, self.scores, self.alerts, self.dead]

    def group(self, role: str) -> str:
        """The consumer group of a part (``workers``, ``alerts``, ``archive``, ``scores``) of the
        deployment with this prefix: ``linewatch-workers`` with the default one. Deployments that
        share a cluster under other prefixes never share a group, so a stalled or killed member of
        one never holds up the other's rebalances."""
        return f"{self.prefix}-{role}"


def partition_for(key: bytes | None, partitions: int, counter: int = 0) -> int:
    """Same key -> same partition, so each stream stays ordered."""
    return (zlib.crc32(key) if key is not None else counter) % partitions


def records_behind(end: int, position: int) -> int:
    """Lag, the one definition linewatch uses (the consumer-lag metric, the worker's summary
    line, the console's tiles): the records of a partition between a reader's position (the
    offset of the next record it will take) and the partition's end (the log-end offset,
    Kafka's high-water mark)."""
    return max(0, end - position)


class Producer(ABC):
    lost = 0  # records the broker acknowledged and then lost (it came back without its log)

    @abstractmethod
    def send(self, topic: str, value: bytes | None, key: bytes | None = None,
             headers: tuple[tuple[str, bytes], ...] = (), timestamp_ms: int | None = None,
             partition: int | None = None) -> None:
        """Queue a record; may block while the bus applies backpressure (or its broker is
        down). ``partition`` overrides the key's partition; ``value=None`` is a tombstone
        (compacted topics). RecordTooLarge for a record above ``max_message_bytes``."""

    @abstractmethod
    def flush(self) -> None:
        """Wait until every queued record is acknowledged; BusError if any was not."""

    def close(self) -> int:
        """Flush and close; how many records were dropped unacknowledged (a stop during an outage)."""
        self.flush()
        return 0


class Consumer(ABC):
    lost = 0  # records never read because the broker lost them (it came back without its log)

    @abstractmethod
    def poll(self, timeout_s: float, max_records: int = 64) -> list[Record]:
        ...

    @abstractmethod
    def commit(self, records: list[Record]) -> None:
        """Commit past the given records (per partition, the highest offset + 1)."""

    @abstractmethod
    def partitions(self, topic: str) -> list[int]:
        ...

    def assigned(self) -> bool:
        """True once the group has given this member its partitions (possibly none: more
        members than partitions), False while it joins or rebalances; readiness reports it."""
        return True

    def lag(self) -> dict[tuple[str, int], int] | None:
        """``records_behind`` for each partition this consumer reads, as far as the broker has
        told (None: nothing known yet). Only as good as the broker's end offsets."""
        return None

    @abstractmethod
    def assignment(self) -> set[tuple[str, int]]:
        """(topic, partition) this consumer reads now. In a group it changes only inside
        ``poll`` (a rebalance), so a caller comparing it after each poll sees every change
        before handling the records of a partition it has just been given."""

    @abstractmethod
    def assign(self, topic: str, partitions: list[int]) -> None:
        """Read these partitions directly, outside any group (replay)."""

    @abstractmethod
    def seek(self, topic: str, partition: int, offset: int) -> None:
        ...

    def end_offsets(self, topic: str) -> dict[int, int] | None:
        """{partition: offset after its last record} of ``topic``, as far as the broker knows
        (None: not known). A reader starting near the end (the console) seeks from it."""
        return None

    def close(self) -> None:
        pass


class Bus(ABC):
    def __init__(self, topics: Topics, partitions: int, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.topics = topics
        self.partitions = partitions
        self.max_message_bytes = max_message_bytes  # the largest record (value, key and headers) it takes

    @abstractmethod
    def ensure_topics(self, names: list[str], partitions: int | None = None, compact: bool = False) -> None:
        """Create the topics that do not exist, with ``partitions`` (default: the bus's);
        ``compact``: a changelog, where a reader keeps the last record per key (Kafka
        compacts such a topic; a reader must not rely on it having done so)."""

    @abstractmethod
    def producer(self) -> Producer:
        ...

    @abstractmethod
    def consumer(self, topics: list[str], group: str | None) -> Consumer:
        """A consumer in ``group`` (committed offsets, partitions shared among members), reading
        from the earliest uncommitted record; ``group=None`` for a group-less reader (replay)."""

    def unpaced(self, group: str) -> None:
        """Records ``group`` has not committed yet hold no producer back (an alert channel that is
        down must not stop the alert sink). Kafka paces no producer by its consumers: nothing to do."""

    def topic_names(self) -> list[str]:
        """The topics on the bus (the console offers results topics to compare)."""
        return self.topics.all()

    def close(self) -> None:
        pass


def record_size(value: bytes | None, key: bytes | None = None, headers: tuple[tuple[str, bytes], ...] = ()) -> int:
    """A record's bytes as a broker counts them against its size limit (give or take its framing)."""
    return len(value or b"") + len(key or b"") + sum(len(name) + len(data) for name, data in headers) + 64


def check_size(limit: int, topic: str, value: bytes | None, key: bytes | None, headers) -> None:
    """RecordTooLarge for a record above ``limit`` bytes, before any broker sees it."""
    size = record_size(value, key, headers)
    if size > limit:
        raise RecordTooLarge(f"a {size}-byte record for {topic} exceeds the {limit}-byte limit (max_message_bytes)")


def next_offsets(records: list[Record]) -> dict[tuple[str, int], int]:
    """{(topic, partition): highest offset + 1} — what to commit after handling ``records``."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        out[(r.topic, r.partition)] = max(out.get((r.topic, r.partition), 0), r.offset + 1)
    return out
