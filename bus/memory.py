"""In-process bus for the embedded default: partitioned logs, consumer groups, backpressure.

Thread-safe; one condition variable guards everything (the embedded pipeline moves tens of
frames per second, not millions of messages). A log keeps a record until every group that
reads its topic has committed past it, and a producer waits while a partition holds
``capacity`` records not yet committed by those groups, so memory stays bounded and a file
source is paced by its consumers rather than dropped. A topic no group reads keeps only its
latest ``capacity`` records.
"""

from __future__ import annotations

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
)


class _Log:
    def __init__(self):
        self.start = 0  # offset of records[0]
        self.records: list[Record] = []

    @property
    def end(self) -> int:
        return self.start + len(self.records)


class MemoryBus(Bus):
    def __init__(self, topics: Topics = Topics(), partitions: int = 1, capacity: int = 256,
                 max_message_bytes: int = MAX_MESSAGE_BYTES):
        super().__init__(topics, partitions, max_message_bytes)
        self.capacity = capacity
        self.cond = threading.Condition()
        self.logs: dict[str, list[_Log]] = {}
        self.committed: dict[str, dict[tuple[str, int], int]] = {}  # group -> offsets
        self.group_topics: dict[str, set[str]] = {}
        self.members: dict[str, list["MemoryConsumer"]] = {}
        self.closed = False
        self.ensure_topics(topics.all())

    def ensure_topics(self, names: list[str]) -> None:
        with self.cond:
            for name in names:
                self.logs.setdefault(name, [_Log() for _ in range(self.partitions)])

    def producer(self) -> Producer:
        return MemoryProducer(self)

    def consumer(self, topics: list[str], group: str | None) -> Consumer:
        return MemoryConsumer(self, topics, group)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def drained(self, topic: str) -> bool:
        """Every group reading ``topic`` has committed all of it (call with ``cond`` held)."""
        return all(self._floor(topic, p) in (None, log.end) for p, log in enumerate(self.logs[topic]))

    # ---- internals (call with self.cond held) -----------------------------------------
    def _floor(self, topic: str, partition: int) -> int | None:
        """Lowest committed offset among groups reading ``topic``; None if nobody reads it."""
        floors = [self.committed[g].get((topic, partition), 0)
                  for g, names in self.group_topics.items() if topic in names]
        return min(floors) if floors else None

    def _trim(self, topic: str, partition: int) -> None:
        log, floor = self.logs[topic][partition], self._floor(topic, partition)
        if floor is not None and floor > log.start:
            del log.records[:floor - log.start]
            log.start = floor

    def _rebalance(self, group: str) -> None:
        members = self.members.get(group, [])
        slots = sorted({(t, p) for m in members for t in m.topics for p in range(self.partitions)})
        for m in members:
            m.owned = set()
        for i, slot in enumerate(slots):
            members[i % len(members)].owned.add(slot)
        for m in members:  # a member resumes each partition it now owns from the group's commit
            m.position = {s: self.committed[group].get(s, 0) for s in m.owned}


class MemoryProducer(Producer):
    def __init__(self, bus: MemoryBus):
        self.bus = bus
        self.counter = itertools.count()

    def send(self, topic, value, key=None, headers=(), timestamp_ms=None) -> None:
        bus = self.bus
        check_size(bus.max_message_bytes, topic, value, key, headers)
        with bus.cond:
            if topic not in bus.logs:
                raise BusError(f"unknown topic {topic!r}")
            partition = partition_for(key, bus.partitions, next(self.counter))
            log = bus.logs[topic][partition]
            while not bus.closed:
                floor = bus._floor(topic, partition)
                if floor is None or log.end - floor < bus.capacity:
                    break
                bus.cond.wait(0.5)
            if bus.closed:
                raise BusError("bus closed")
            log.records.append(Record(topic, bytes(value), key, tuple(headers), partition, log.end,
                                      timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)))
            if bus._floor(topic, partition) is None and len(log.records) > bus.capacity:
                del log.records[0]  # a topic nobody reads keeps only its latest records
                log.start += 1
            bus.cond.notify_all()

    def flush(self) -> None:  # appends are synchronous: nothing is ever in flight
        pass


class MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, topics: list[str], group: str | None):
        self.bus, self.topics, self.group = bus, list(topics), group
        self.owned: set[tuple[str, int]] = set()
        self.position: dict[tuple[str, int], int] = {}
        with bus.cond:
            for topic in topics:
                if topic not in bus.logs:
                    raise BusError(f"unknown topic {topic!r}")
            if group is not None:
                bus.committed.setdefault(group, {})
                bus.group_topics.setdefault(group, set()).update(topics)
                bus.members.setdefault(group, []).append(self)
                bus._rebalance(group)

    def poll(self, timeout_s: float, max_records: int = 64) -> list[Record]:
        bus, deadline = self.bus, time.monotonic() + timeout_s
        with bus.cond:
            while True:
                out: list[Record] = []
                for slot in sorted(self.owned):
                    log = bus.logs[slot[0]][slot[1]]
                    pos = max(self.position.get(slot, 0), log.start)
                    take = log.records[pos - log.start: pos - log.start + max_records - len(out)]
                    out += take
                    self.position[slot] = pos + len(take)
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
        return list(range(self.bus.partitions))

    def assign(self, topic: str, partitions: list[int]) -> None:
        self.owned = {(topic, p) for p in partitions}
        self.position = {s: self.bus.logs[topic][s[1]].start for s in self.owned}

    def seek(self, topic: str, partition: int, offset: int) -> None:
        self.position[(topic, partition)] = offset

    def close(self) -> None:
        bus = self.bus
        with bus.cond:
            if self.group is not None and self in bus.members.get(self.group, []):
                bus.members[self.group].remove(self)
                bus._rebalance(self.group)
            bus.cond.notify_all()
