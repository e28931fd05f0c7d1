"""Outages ridden out, loudly (issue 13, item 5), without services: the outage state each part
exposes (``bus.outages``), and the archive sink waiting out its store. The same against real
Tansu, Redis and SeaweedFS, with processes killed and restarted, is ``test_faults.py``."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import pytest

from linewatch.bus import Topics
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import encode
from linewatch.bus.outages import Backoff, Outages, StopRequested, retrying
from linewatch.sinks.archive import Archive, StoreUnavailable
from linewatch.sinks.archive_sink import run_archive_sink

from helpers import score_msg, wait_for

FAST = Backoff(initial=0.01, cap=0.02)


def test_an_outage_is_one_warning_and_one_line_and_readiness_follows(caplog):
    outages = Outages(recovery_s=0)
    with caplog.at_level(logging.INFO, logger="linewatch.outages"):
        for _ in range(5):  # every failed retry, from two clients of the part
            outages.down("worker", "Kafka at k:9092", "connection refused", "produce")
            outages.down("worker", "Kafka at k:9092", "no coordinator", "consume")
        outages.down("worker", "Redis at redis://:pw@r:6379/0", "timeout", critical=False)
        assert not outages.ready("worker") and outages.ready("ingest") and not outages.ready()
        snapshot = outages.snapshot()
        assert snapshot["parts"]["worker"]["down"]["Kafka at k:9092"]["reason"] == "connection refused"
        outages.up("worker", "Kafka at k:9092", "produce")
        assert not outages.ready("worker")  # the consumer has not seen it back yet
        outages.up("worker", "Kafka at k:9092", "consume")
        assert outages.ready("worker")  # Redis down only degrades a worker
        assert outages.snapshot()["parts"]["worker"]["down"].keys() == {"Redis at redis://:***@r:6379/0"}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("Kafka at k:9092 unavailable" in line for line in lines) == 1
    assert sum("Kafka at k:9092 is back after" in line for line in lines) == 1
    assert not any("pw@" in line for line in lines)


def test_an_outage_that_flaps_while_its_clients_recover_is_still_one(caplog):
    """A producer sees Kafka back before the consumer's next commit fails: the same outage goes
    on (no second warning); it is over once everyone has seen it back for ``recovery_s``."""
    outages = Outages(recovery_s=0.2)
    with caplog.at_level(logging.INFO, logger="linewatch.outages"):
        outages.down("sink-alerts", "Kafka at k:9092", "records not acknowledged", "produce")
        outages.up("sink-alerts", "Kafka at k:9092", "produce")
        assert outages.ready("sink-alerts")  # recovering counts as ready
        outages.down("sink-alerts", "Kafka at k:9092", "cannot commit", "consume")
        assert not outages.ready("sink-alerts")
        outages.up("sink-alerts", "Kafka at k:9092", "consume")
        wait_for(lambda: any("is back after" in r.getMessage() for r in caplog.records), what="the outage to end")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in line for line in lines) == 1 and sum("is back after" in line for line in lines) == 1
    assert outages.snapshot()["parts"]["sink-alerts"]["down"] == {}
    with caplog.at_level(logging.INFO, logger="linewatch.outages"):
        outages.down("ingest", "Kafka at k:9092", "refused", "produce")
        outages.up("ingest", "Kafka at k:9092", "produce")
        outages.settle()  # the part finished its work while recovering: the line is said now, not lost
    assert sum("ingest: Kafka at k:9092 is back after" in r.getMessage() for r in caplog.records) == 1


def test_retrying_waits_out_transient_errors_and_answers_a_stop():
    outages, calls = Outages(), []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("refused")
        return "done"

    assert retrying(flaky, part="p", dependency="d", transient=(ConnectionError,), stop=threading.Event(),
                    backoff=FAST, outages=outages) == "done"
    assert len(calls) == 4 and outages.ready()
    with pytest.raises(ValueError):  # not transient: passes through at once
        retrying(lambda: int("x"), part="p", dependency="d", transient=(ConnectionError,), stop=None, outages=outages)
    stop = threading.Event()
    stop.set()
    with pytest.raises(StopRequested):
        retrying(lambda: flaky() if False else (_ for _ in ()).throw(ConnectionError("down")), part="p",
                 dependency="d", transient=(ConnectionError,), stop=stop, outages=outages)


@contextmanager
def sink_running(bus, archive, stop: threading.Event, result: dict):
    """The archive sink in a thread, stopped (as by SIGTERM) when the block ends, however it ends."""
    sink = threading.Thread(target=lambda: result.update(stats=run_archive_sink(bus, archive, stop=stop, poll_s=0.05)),
                            daemon=True)
    sink.start()
    try:
        yield sink
    finally:
        stop.set()
        sink.join(10)


class FlakyStore:
    """The archive's local store, down while ``down`` is set (each write refused, as S3 refuses
    connections), counting the refusals."""

    def __init__(self, store):
        self.store, self.down, self.refused = store, threading.Event(), 0
        self.name = "the test store"

    def put(self, key, data, content_type):
        if self.down.is_set():
            self.refused += 1
            raise StoreUnavailable("connection refused")
        self.store.put(key, data, content_type)

    def url(self, key):
        return self.store.url(key)


def test_the_archive_sink_waits_out_a_store_outage(tmp_path, caplog):
    """Three scores arrive while the store is down: the sink retries (said once), archives all
    three when it is back, and commits nothing before: files and index rows agree."""
    bus = MemoryBus(Topics("o"))
    archive = Archive(tmp_path)
    archive.store = store = FlakyStore(archive.store)
    store.down.set()
    for seq in range(3):
        bus.producer().send(bus.topics.scores, encode(score_msg(seq, 0.9)), key=b"cam")
    stop, result = threading.Event(), {}
    with caplog.at_level(logging.INFO, logger="linewatch.outages"), sink_running(bus, archive, stop, result):
        wait_for(lambda: store.refused >= 3, what="the sink to retry")
        assert bus.committed.get(bus.topics.group("archive"), {}).get((bus.topics.scores, 0), 0) == 0
        store.down.clear()
        wait_for(lambda: bus.committed[bus.topics.group("archive")].get((bus.topics.scores, 0)) == 3, what="the commit")
        wait_for(lambda: any("is back after" in r.getMessage() for r in caplog.records), what="the outage's end")
    assert result["stats"].archived == 3 and result["stats"].dead == 0
    assert len(list(tmp_path.rglob("*.json"))) == 3 and len(list(tmp_path.rglob("*.mask.png"))) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in line for line in lines) == 1 and sum("is back after" in line for line in lines) == 1


def test_a_stop_during_a_store_outage_commits_only_what_was_archived(tmp_path):
    bus = MemoryBus(Topics("o"))
    archive = Archive(tmp_path)
    archive.store = store = FlakyStore(archive.store)
    producer = bus.producer()
    producer.send(bus.topics.scores, encode(score_msg(0, 0.9)), key=b"cam")
    stop, result = threading.Event(), {}
    with sink_running(bus, archive, stop, result) as sink:
        wait_for(lambda: bus.committed.get(bus.topics.group("archive"), {}).get((bus.topics.scores, 0)) == 1)
        store.down.set()
        producer.send(bus.topics.scores, encode(score_msg(1, 0.9)), key=b"cam")
        wait_for(lambda: store.refused >= 1)
    assert not sink.is_alive() and result["stats"].archived == 1  # stopped (SIGTERM) during the outage
    assert bus.committed[bus.topics.group("archive")][(bus.topics.scores, 0)] == 1  # seq 1 is read again next time
