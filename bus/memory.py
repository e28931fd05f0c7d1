"""In-process bus for the embedded default: partitioned logs, consumer groups, backpressure.

Thread-safe; one condition variable guards everything (the embedded pipeline moves tens of
frames per second, not millions of messages). A log keeps a record until every group that
reads its topic has committed past it, and a producer waits while a partition holds
``capacity`` records not yet committed by those groups, so memory stays bounded and a file
source is paced by its consumers rather than dropped. A topic no group reads keeps only its
latest ``capacity`` records; a compacted one (a changelog) keeps the latest record of each
key instead, dropping tombstones, as Kafka's log compaction would (offsets keep their gaps).
An ``unpaced`` group (an alert channel) keeps the records it has not committed but holds no
producer back: a channel that is down grows its backlog instead of stopping the alert sink.

Group rebalances behave like Kafka's eager protocol: a member learns of its new assignment
in ``poll``, and a partition moves to its new owner only once the old one has let go of it
(polled, or closed), so the two never read it at the same time.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time

from . import (
    MAX_MESSAGE_BYTES,
    Bus,
    BusError,
    Consumer,
    Producer,
    Record,
    Topics,
    check_size,
    next_offsets,
    partition_for,
    records_behind,
)


class _Log:
    """One partition: records in offset order (with gaps once compacted) and the next offset."""

    def __init__(self):
        self.records: list[Record] = []
        self.end = 0

    @property
    def start(self) -> int:
        return self.records[0].offset if self.records else self.end

    def read(self, position: int, limit: int) -> list[Record]:
        first = bisect.bisect_left(self.records, position, key=lambda r: r.offset)
        return self.records[first:first + limit]

    def append(self, record: Record) -> None:
        self.records.append(record)
        self.end = record.offset + 1

    def trim(self, floor: int) -> None:
        """Drop the records below ``floor``."""
        del self.records[:bisect.bisect_left(self.records, floor, key=lambda r: r.offset)]

    def compact(self) -> None:
        """Keep the last record of each key; a key whose last record is a tombstone goes."""
        last = {record.key: record for record in self.records}
        self.records = [r for r in self.records if last[r.key] is r and r.value is not None]


class MemoryBus(Bus):
    def __init__(self, topics: Topics = Topics(), partitions: int = 1, capacity: int = 256,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, limits: dict[str, int] | None = None, retain: int = 0):
        """``limits``: a smaller ``capacity`` for some topics (the embedded run's frames: a file
        is read only a few batches ahead of the worker). ``retain``: records kept per partition
        below the lowest committed offset, Kafka's retention in small, so a reader outside any
        group (the console) that falls behind for a moment misses nothing every group has taken."""
        super().__init__(topics, partitions, max_message_bytes)
        self.capacity, self.retain = capacity, retain
        self.limits = dict(limits or {})
        self.cond = threading.Condition()
        self.logs: dict[str, list[_Log]] = {}
        self.compacted: set[str] = set()
        self.committed: dict[str, dict[tuple[str, int], int]] = {}  # group -> offsets
        self.group_topics: dict[str, set[str]] = {}
        self.members: dict[str, list["MemoryConsumer"]] = {}
        self.holders: dict[str, dict[tuple[str, int], "MemoryConsumer"]] = {}  # group -> slot -> reader
        self.unpaced_groups: set[str] = set()
        self.closed = False
        self.ensure_topics(topics.all())

    def ensure_topics(self, names: list[str], partitions: int | None = None, compact: bool = False) -> None:
        with self.cond:
            for name in names:
                self.logs.setdefault(name, [_Log() for _ in range(partitions or self.partitions)])
                if compact:
                    self.compacted.add(name)

    def producer(self) -> Producer:
        return MemoryProducer(self)

    def consumer(self, topics: list[str], group: str | None) -> Consumer:
        return MemoryConsumer(self, topics, group)

    def unpaced(self, group: str) -> None:
        with self.cond:
            self.unpaced_groups.add(group)
            self.cond.notify_all()

    def topic_names(self) -> list[str]:
        with self.cond:
            return sorted(self.logs)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drained(self, topic: str) -> bool:
        """Every group reading ``topic`` has committed all of it (call with ``cond`` held)."""
        return all(self._floor(topic, p) in (None, log.end) for p, log in enumerate(self.logs[topic]))

    # ---- internals (call with self.cond held) -----------------------------------------
    def _floor(self, topic: str, partition: int, pacing: bool = False) -> int | None:
        """Lowest committed offset among groups reading ``topic`` (``pacing``: among those that
        pace its producers); None if nobody reads it."""
        floors = [self.committed[g].get((topic, partition), 0) for g, names in self.group_topics.items()
                  if topic in names and not (pacing and g in self.unpaced_groups)]
        return min(floors) if floors else None

    def _trim(self, topic: str, partition: int) -> None:
        floor = self._floor(topic, partition)
        if floor is not None:
            self.logs[topic][partition].trim(floor - self.retain)

    def _rebalance(self, group: str) -> None:
        """A new target assignment; members take it up in their next ``poll``."""
        members = self.members.get(group, [])
        slots = sorted({(t, p) for m in members for t in m.topics for p in range(len(self.logs[t]))})
        for m in members:
            m.target = set()
        for i, slot in enumerate(slots):
            members[i % len(members)].target.add(slot)
        self.cond.notify_all()


class MemoryProducer(Producer):
    def __init__(self, bus: MemoryBus):
        self.bus = bus
        self.counter = itertools.count()

    def send(self, topic, value, key=None, headers=(), timestamp_ms=None, partition=None) -> None:
        bus = self.bus
        check_size(bus.max_message_bytes, topic, value, key, headers)
        with bus.cond:
            if topic not in bus.logs:
                raise BusError(f"unknown topic {topic!r}")
            logs = bus.logs[topic]
            if partition is None:
                partition = partition_for(key, len(logs), next(self.counter))
            elif not 0 <= partition < len(logs):
                raise BusError(f"{topic} has no partition {partition}")
            log = logs[partition]
            while not bus.closed:
                floor = bus._floor(topic, partition, pacing=True)
                if floor is None or log.end - floor < bus.limits.get(topic, bus.capacity):
                    break
                bus.cond.wait(0.5)
            if bus.closed:
                raise BusError("bus closed")
            log.append(Record(topic, None if value is None else bytes(value), key, tuple(headers), partition,
                              log.end, timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)))
            if bus._floor(topic, partition) is None and len(log.records) > bus.capacity:
                if topic in bus.compacted:
                    log.compact()
                if len(log.records) > bus.capacity and topic not in bus.compacted:
                    del log.records[0]  # a topic nobody reads keeps only its latest records
            bus.cond.notify_all()

    def flush(self) -> None:  # appends are synchronous: nothing is ever in flight
        pass


class MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, topics: list[str], group: str | None):
        self.bus, self.topics, self.group = bus, list(topics), group
        self.owned: set[tuple[str, int]] = set()  # what it reads now
        self.target: set[tuple[str, int]] = set()  # what the group's last rebalance gave it
        self.position: dict[tuple[str, int], int] = {}
        with bus.cond:
            for topic in topics:
                if topic not in bus.logs:
                    raise BusError(f"unknown topic {topic!r}")
            if group is not None:
                bus.committed.setdefault(group, {})
                bus.group_topics.setdefault(group, set()).update(topics)
                bus.members.setdefault(group, []).append(self)
                bus.holders.setdefault(group, {})
                bus._rebalance(group)

    def _take_assignment(self) -> None:
        """Let go of what the group took away, then take up what it gave, where the previous
        reader has let go (call with ``bus.cond`` held)."""
        if self.group is None or self.owned == self.target:
            return
        holders = self.bus.holders[self.group]
        for slot in self.owned - self.target:
            if holders.get(slot) is self:
                del holders[slot]
            self.position.pop(slot, None)
        self.owned &= self.target
        for slot in self.target - self.owned:
            if slot not in holders:
                holders[slot] = self
                self.owned.add(slot)
                self.position[slot] = self.bus.committed[self.group].get(slot, 0)
        self.bus.cond.notify_all()

    def poll(self, timeout_s: float, max_records: int = 64) -> list[Record]:
        bus, deadline = self.bus, time.monotonic() + timeout_s
        with bus.cond:
            while True:
                self._take_assignment()
                out: list[Record] = []
                for slot in sorted(self.owned):
                    take = bus.logs[slot[0]][slot[1]].read(self.position.get(slot, 0), max_records - len(out))
                    if take:
                        out += take
                        self.position[slot] = take[-1].offset + 1
                    if len(out) >= max_records:
                        break
                remaining = deadline - time.monotonic()
                if out or remaining <= 0 or bus.closed:
                    return out
                bus.cond.wait(remaining)

    def commit(self, records: list[Record]) -> None:
        if self.group is None:
            return
        bus = self.bus
        with bus.cond:
            offsets = bus.committed[self.group]
            for slot, offset in next_offsets(records).items():
                if slot in self.owned:  # a partition moved to another member: its commit is theirs
                    offsets[slot] = max(offsets.get(slot, 0), offset)
                    bus._trim(*slot)
            bus.cond.notify_all()

    def partitions(self, topic: str) -> list[int]:
        return list(range(len(self.bus.logs[topic])))

    def assignment(self) -> set[tuple[str, int]]:
        with self.bus.cond:
            return set(self.owned)

    def lag(self) -> dict[tuple[str, int], int]:
        with self.bus.cond:  # exact: the logs are here
            self._take_assignment()
            logs = self.bus.logs
            return {slot: records_behind(logs[slot[0]][slot[1]].end,
                                         max(self.position.get(slot, 0), logs[slot[0]][slot[1]].start))
                    for slot in sorted(self.owned)}

    def assign(self, topic: str, partitions: list[int]) -> None:
        with self.bus.cond:
            self.owned = {(topic, p) for p in partitions}
            self.position = {s: self.bus.logs[topic][s[1]].start for s in self.owned}

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.position[(topic, partition)] = offset

    def end_offsets(self, topic: str) -> dict[int, int]:
        with self.bus.cond:
            return {p: log.end for p, log in enumerate(self.bus.logs[topic])}

    def close(self) -> None:
        bus = self.bus
        with bus.cond:
            if self.group is not None and self in bus.members.get(self.group, []):
                bus.members[self.group].remove(self)
                holders = bus.holders[self.group]
                for slot in [s for s, holder in holders.items() if holder is self]:
                    del holders[slot]
                self.owned = set()
                bus._rebalance(self.group)
            bus.cond.notify_all()
