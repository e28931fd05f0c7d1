"""The bus interface on both implementations: in-process always, Kafka on a real Tansu broker."""

from __future__ import annotations

import threading
import time

import pytest

from linewatch.bus import BusError, Record, Topics, next_offsets, partition_for
from linewatch.bus.memory import MemoryBus
from linewatch.pipeline.wiring import connect

from helpers import wait_for


def poll_all(consumer, want: int, timeout: float = 20.0) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += consumer.poll(0.5, 64)
    return got


def test_same_key_same_partition_and_order():
    bus = MemoryBus(Topics("t"), partitions=3)
    producer = bus.producer()
    for i in range(30):
        producer.send(bus.topics.frames, str(i).encode(), key=f"cam{i % 3}".encode())
    consumer = bus.consumer([bus.topics.frames], "g")
    records = poll_all(consumer, 30)
    assert len(records) == 30
    for key in (b"cam0", b"cam1", b"cam2"):
        mine = [r for r in records if r.key == key]
        assert {r.partition for r in mine} == {partition_for(key, 3)}
        assert [int(r.value) for r in mine] == sorted(int(r.value) for r in mine)


def test_group_resumes_from_commit_and_groups_are_independent():
    bus = MemoryBus(Topics("t"))
    producer = bus.producer()
    for i in range(10):
        producer.send(bus.topics.scores, bytes([i]), key=b"s")
    first = bus.consumer([bus.topics.scores], "a")
    other = bus.consumer([bus.topics.scores], "b")
    batch = first.poll(0.1, 4)
    first.commit(batch)
    first.close()
    again = bus.consumer([bus.topics.scores], "a")
    assert [r.value[0] for r in poll_all(again, 6)] == list(range(4, 10))
    assert len(poll_all(other, 10)) == 10  # group b has committed nothing


def test_uncommitted_records_are_redelivered_to_the_next_member():
    bus = MemoryBus(Topics("t"))
    producer = bus.producer()
    for i in range(5):
        producer.send(bus.topics.frames, bytes([i]))
    dying = bus.consumer([bus.topics.frames], "w")
    assert len(dying.poll(0.1, 5)) == 5  # read, never committed
    dying.close()
    heir = bus.consumer([bus.topics.frames], "w")
    assert [r.value[0] for r in poll_all(heir, 5)] == [0, 1, 2, 3, 4]


def test_members_of_a_group_split_partitions():
    bus = MemoryBus(Topics("t"), partitions=4)
    a, b = bus.consumer([bus.topics.frames], "w"), bus.consumer([bus.topics.frames], "w")
    a.poll(0), b.poll(0)  # a member takes up its assignment in poll, like Kafka's
    assert a.assignment() and b.assignment() and not (a.assignment() & b.assignment())
    assert len(a.assignment() | b.assignment()) == 4


def test_a_partition_moves_only_once_its_reader_has_let_go():
    """Like Kafka's eager rebalance: the newcomer does not read a partition while its old
    reader still holds it (has not polled since), so the two never handle it at once."""
    bus = MemoryBus(Topics("t"), partitions=2)
    producer = bus.producer()
    for partition in (0, 1):
        producer.send(bus.topics.scores, b"x", partition=partition)
    old = bus.consumer([bus.topics.scores], "g")
    assert len(old.poll(0.1)) == 2 and old.assignment() == {(bus.topics.scores, 0), (bus.topics.scores, 1)}
    new = bus.consumer([bus.topics.scores], "g")
    assert new.poll(0.1) == [] and new.assignment() == set()  # the old reader has not let go yet
    old.poll(0)  # ... now it has, of one partition: it learns of the rebalance in poll
    assert len(old.assignment()) == 1
    taken = new.poll(0.1)  # uncommitted: the record is read again by its new reader
    assert len(taken) == 1 and new.assignment() == {(bus.topics.scores, taken[0].partition)}
    assert not (old.assignment() & new.assignment())


def test_explicit_partition_and_tombstones():
    bus = MemoryBus(Topics("t"), partitions=3)
    producer = bus.producer()
    producer.send(bus.topics.scores, None, key=b"k", partition=2)
    with pytest.raises(BusError, match="no partition 3"):
        producer.send(bus.topics.scores, b"x", partition=3)
    reader = bus.consumer([], None)
    reader.assign(bus.topics.scores, [2])
    assert [(r.key, r.value, r.partition) for r in reader.poll(0.1)] == [(b"k", None, 2)]


def test_compacted_topic_keeps_the_last_record_per_key():
    bus = MemoryBus(Topics("t"), capacity=4)
    bus.ensure_topics(["t.changelog"], partitions=2, compact=True)
    producer = bus.producer()
    for i in range(30):
        producer.send("t.changelog", bytes([i]), key=f"k{i % 3}".encode(), partition=1)
    producer.send("t.changelog", None, key=b"k0", partition=1)  # deleted
    producer.send("t.changelog", b"y", key=b"fresh", partition=1)
    reader = bus.consumer([], None)
    assert reader.partitions("t.changelog") == [0, 1]
    reader.assign("t.changelog", [1])
    reader.seek("t.changelog", 1, 0)
    latest = {}
    for record in reader.poll(0.1, 1000):
        latest[record.key] = record.value
    assert {k: v for k, v in latest.items() if v is not None} == {b"k1": bytes([28]), b"k2": bytes([29]), b"fresh": b"y"}
    with bus.cond:
        assert len(bus.logs["t.changelog"][1].records) <= 2 * 4  # compacted, not grown without bound


def test_producer_waits_for_slow_consumer_and_memory_stays_bounded():
    bus = MemoryBus(Topics("t"), capacity=4)
    consumer = bus.consumer([bus.topics.frames], "slow")
    sent = []

    def produce():
        producer = bus.producer()
        for i in range(20):
            producer.send(bus.topics.frames, bytes([i]))
            sent.append(i)

    thread = threading.Thread(target=produce)
    thread.start()
    wait_for(lambda: len(sent) == 4, what="the producer to fill the partition")
    received = []
    while len(received) < 20:
        batch = consumer.poll(1.0, 3)
        assert len(sent) <= len(received) + 4  # the producer never runs more than capacity ahead: it waits
        received += [r.value[0] for r in batch]
        consumer.commit(batch)
        with bus.cond:
            assert len(bus.logs[bus.topics.frames][0].records) <= 4
    thread.join(5)
    assert received == list(range(20))
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_topic_nobody_reads_keeps_only_latest():
    bus = MemoryBus(Topics("t"), capacity=3)
    producer = bus.producer()
    for i in range(10):
        producer.send(bus.topics.dead, bytes([i]))  # must not block
    reader = bus.consumer([], None)
    reader.assign(bus.topics.dead, [0])
    assert [r.value[0] for r in reader.poll(0.1)] == [7, 8, 9]


def test_next_offsets_per_partition():
    records = [Record("x", b"", partition=0, offset=3), Record("x", b"", partition=0, offset=7),
               Record("x", b"", partition=1, offset=2)]
    assert next_offsets(records) == {("x", 0): 8, ("x", 1): 3}


def test_bad_bus_urls():
    with pytest.raises(BusError, match="memory:// or kafka://"):
        connect("redis://localhost:6379")


def test_unreachable_broker_names_the_address():
    with pytest.raises(BusError, match="cannot reach Kafka at 127.0.0.1:1"):
        connect("kafka://127.0.0.1:1")


def test_kafka_roundtrip_headers_groups_and_seek(kafka_servers):
    bus = connect(f"kafka://{kafka_servers}", prefix="bus-test", partitions=2)
    producer = bus.producer()
    for i in range(12):
        producer.send(bus.topics.frames, f"v{i}".encode(), key=f"s{i % 3}".encode(), headers=(("lw", b"{}"),),
                      timestamp_ms=1_000_000 + i)
    producer.flush()
    consumer = bus.consumer([bus.topics.frames], "bus-test-g")
    records = poll_all(consumer, 12)
    assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(12))
    assert all(r.headers == (("lw", b"{}"),) for r in records)
    for key in (b"s0", b"s1", b"s2"):  # Kafka's own partitioner (murmur2): one partition per key
        assert len({r.partition for r in records if r.key == key}) == 1
    half = [r for r in records if r.partition == 0]
    assert 0 < len(half) < 12, "three keys on two partitions all hashed to one; pick other keys"
    consumer.commit(half)
    consumer.close()
    # a new member of the group resumes after the commit: only partition 1 comes back
    again = bus.consumer([bus.topics.frames], "bus-test-g")
    rest = poll_all(again, 12 - len(half))
    assert {r.partition for r in rest} == {1} and len(rest) == 12 - len(half)
    again.close()
    reader = bus.consumer([], None)
    assert reader.partitions(bus.topics.frames) == [0, 1]
    reader.assign(bus.topics.frames, [0])
    reader.seek(bus.topics.frames, 0, 1)
    assert [r.offset for r in poll_all(reader, len(half) - 1)] == list(range(1, len(half)))
    reader.close()
    producer.close()


@pytest.mark.parametrize("retain", [0, 8])
def test_a_reader_outside_any_group_still_sees_what_every_group_committed_within_the_retention(retain):
    """The console reads the embedded run's topics outside any group: records every group has
    taken stay ``retain`` deep, so a console a moment behind misses none of them."""
    bus = MemoryBus(Topics("t"), partitions=1, retain=retain)
    producer, group = bus.producer(), bus.consumer([bus.topics.scores], "sink")
    for i in range(5):
        producer.send(bus.topics.scores, bytes([i]))
    taken = []
    while len(taken) < 5:
        batch = group.poll(1.0)
        taken += batch
        group.commit(batch)
    outside = bus.consumer([], None)
    outside.assign(bus.topics.scores, [0])
    outside.seek(bus.topics.scores, 0, 0)
    assert [r.value[0] for r in outside.poll(0.0)] == ([0, 1, 2, 3, 4] if retain else [])
