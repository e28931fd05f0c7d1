"""The alert sink as real `linewatch sink alerts` processes on a Tansu broker: killed with
SIGKILL mid-event and restarted, and a second instance taking partitions over (from a live
member, then from a killed one). Every event opened is closed exactly once, no event id is
raised twice, no event is split."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from pathlib import Path

import pytest
from kafka.partitioner import murmur2

from linewatch.bus.messages import AlertMsg, ScoreMsg, SessionEnd, decode, encode
from linewatch.pipeline.wiring import connect
from linewatch.sinks.alert_state import PENDING, state_topic

from helpers import Processes, read_topic, score_msg, wait_for

PARTITIONS = 2


def streams_on_both_partitions() -> list[str]:
    """Two stream ids Kafka's partitioner (murmur2) puts on different partitions."""
    names = [f"drone-{letter}" for letter in "abcdefghijklmnop"]
    by_partition = {(murmur2(n.encode()) & 0x7FFFFFFF) % PARTITIONS: n for n in reversed(names)}
    return [by_partition[0], by_partition[1]]


def pattern(bits: str, stream: str, start: int) -> list[ScoreMsg]:
    return [score_msg(start + i, 0.9 if bit == "1" else 0.1, stream=stream) for i, bit in enumerate(bits)]


DEFECT = "0011111111" + "1111100000"  # one defect, frames 2..14; an event open after the first half


class Sinks:
    """`linewatch sink alerts` processes of one test's topics, each with its own JSONL file."""

    def __init__(self, processes, servers: str, prefix: str, folder: Path):
        self.processes, self.servers, self.prefix, self.folder = processes, servers, prefix, folder
        self.log, self.kill, self.stop = processes.log, processes.kill, processes.stop

    def start(self, name: str, jsonl: str) -> None:
        self.processes.start(name, "sink", "alerts", "--bootstrap-servers", self.servers, "--topic-prefix", self.prefix,
                             "--partitions", str(PARTITIONS), "--jsonl", str(self.folder / jsonl))

    def restored(self, name: str) -> int:
        """How many times ``name`` has taken partitions up with state to restore (it logs each)."""
        self.processes.alive(name)
        return self.log(name).count("restored:")


@pytest.fixture
def setup(kafka_servers, tmp_path):
    prefix = f"as-{secrets.token_hex(3)}"  # topics of this test only
    processes = Processes(tmp_path)
    yield connect(f"kafka://{kafka_servers}", prefix, PARTITIONS), Sinks(processes, kafka_servers, prefix, tmp_path)
    processes.stop_all()


def publish(bus, messages) -> None:
    producer = bus.producer()
    for m in messages:
        stream = m.frame.stream if isinstance(m, ScoreMsg) else m.stream
        producer.send(bus.topics.scores, encode(m), key=stream.encode())
    producer.close()


def jsonl_rows(folder: Path, *names: str) -> list[tuple[str, str]]:
    rows = []
    for name in names:
        path = folder / name
        rows += [(r["event_id"], r["status"]) for r in map(json.loads, path.read_text().splitlines())] \
            if path.exists() else []
    return rows


def topic_alerts(bus) -> list[AlertMsg]:
    return [decode(r.value, AlertMsg) for r in read_topic(bus, bus.topics.alerts)]


def undelivered(bus) -> set[bytes]:
    """Pending-alert keys on the state topic not yet tombstoned (delivered everywhere: empty)."""
    latest = {}
    for record in read_topic(bus, state_topic(bus.topics.scores, bus.topics.group("alerts"))):
        if record.key.startswith(PENDING.encode()):
            latest[record.key] = record.value
    return {key for key, value in latest.items() if value is not None}


def quiet(bus, folder: Path, files: tuple[str, ...], expected: set[tuple[str, str]]) -> bool:
    """Every expected alert in the files and on the topic, and none left pending."""
    return (expected <= set(jsonl_rows(folder, *files))
            and expected <= {(a.event_id, a.status) for a in topic_alerts(bus)} and not undelivered(bus))


def consumed(bus, count: int) -> bool:
    """The group has committed ``count`` records of the scores topic."""
    from kafka import KafkaConsumer, TopicPartition

    probe = KafkaConsumer(bootstrap_servers=bus.servers, group_id=bus.topics.group("alerts"), enable_auto_commit=False)
    try:
        offsets = [probe.committed(TopicPartition(bus.topics.scores, p)) for p in range(PARTITIONS)]
    finally:
        probe.close()
    return sum(o or 0 for o in offsets) >= count


def assert_exactly_once(rows: list[tuple[str, str]], events: set[str]) -> None:
    counts = Counter(rows)
    assert counts == Counter({(e, s): 1 for e in events for s in ("open", "closed")}), counts


def test_a_sink_killed_mid_event_resumes_it_after_a_restart(setup, tmp_path):
    bus, sinks = setup
    stream, other = streams_on_both_partitions()
    scores = pattern(DEFECT, stream, 0)
    sinks.start("first", "alerts.jsonl")
    publish(bus, scores[:10])
    opened = {(f"{stream}:2", "open")}
    wait_for(lambda: quiet(bus, tmp_path, ("alerts.jsonl",), opened), timeout_s=120, what="the open alert")
    sinks.kill("first")  # SIGKILL mid-event: nothing flushed, nothing said

    publish(bus, scores[10:] + [SessionEnd(stream=stream, frames=len(scores), ts=2000.0)])
    sinks.start("second", "alerts.jsonl")
    closed = opened | {(f"{stream}:2", "closed")}
    wait_for(lambda: quiet(bus, tmp_path, ("alerts.jsonl",), closed), timeout_s=120, what="the closed alert")
    assert "1 open event(s)" in sinks.log("second")  # it took the event over, open
    assert_exactly_once(jsonl_rows(tmp_path, "alerts.jsonl"), {f"{stream}:2"})
    alerts = topic_alerts(bus)
    assert_exactly_once([(a.event_id, a.status) for a in alerts], {f"{stream}:2"})
    assert alerts[-1].frames == list(range(2, 15))  # one event, not split at the kill

    # killed again, this time at once, at any moment of a second event: the file still has
    # every alert once; on the topic an alert may come twice only as the same message again
    # (delivered in the instant before it was recorded as delivered), never raised anew
    more = pattern(DEFECT, other, 0)
    publish(bus, more[:12])
    wait_for(lambda: (f"{other}:2", "open") in jsonl_rows(tmp_path, "alerts.jsonl"), timeout_s=60)
    sinks.kill("second")
    publish(bus, more[12:] + [SessionEnd(stream=other, frames=len(more), ts=2000.0)])
    sinks.start("third", "alerts.jsonl")
    both = closed | {(f"{other}:2", s) for s in ("open", "closed")}
    wait_for(lambda: quiet(bus, tmp_path, ("alerts.jsonl",), both), timeout_s=120, what="the second event")
    sinks.stop("third")
    assert_exactly_once(jsonl_rows(tmp_path, "alerts.jsonl"), {f"{stream}:2", f"{other}:2"})
    by_key: dict[tuple[str, str], set[str]] = {}
    for alert in topic_alerts(bus):
        by_key.setdefault((alert.event_id, alert.status), set()).add(alert.model_dump_json())
    assert set(by_key) == both and all(len(versions) == 1 for versions in by_key.values())


def test_a_second_sink_takes_over_from_a_live_one_and_then_from_a_killed_one(setup, tmp_path):
    bus, sinks = setup
    streams = streams_on_both_partitions()
    scores = {s: pattern(DEFECT + "0" * 6, s, 0) for s in streams}  # 26 frames, defect 2..14
    sinks.start("a", "a.jsonl")
    publish(bus, [m for s in streams for m in scores[s][:6]])
    opened = {(f"{s}:2", "open") for s in streams}
    wait_for(lambda: quiet(bus, tmp_path, ("a.jsonl",), opened), timeout_s=120, what="both events to open")

    sinks.start("b", "b.jsonl")  # joins the group: one partition moves to it, mid-event
    wait_for(lambda: sinks.restored("b") and "went to another sink" in sinks.log("a"), timeout_s=120,
             what="the rebalance")
    publish(bus, [m for s in streams for m in scores[s][6:12]])
    wait_for(lambda: not undelivered(bus) and consumed(bus, 12 * len(streams)), timeout_s=60)

    sinks.kill("a")  # b takes the rest over once the group notices
    wait_for(lambda: sinks.restored("b") >= 2, timeout_s=120,
             what="b to take over a's partition")
    publish(bus, [m for s in streams for m in [*scores[s][12:], SessionEnd(stream=s, frames=26, ts=2000.0)]])
    expected = {(f"{s}:2", status) for s in streams for status in ("open", "closed")}
    wait_for(lambda: quiet(bus, tmp_path, ("a.jsonl", "b.jsonl"), expected), timeout_s=120, what="both events to close")
    sinks.stop("b")
    assert_exactly_once(jsonl_rows(tmp_path, "a.jsonl", "b.jsonl"), {f"{s}:2" for s in streams})
    alerts = topic_alerts(bus)
    assert_exactly_once([(a.event_id, a.status) for a in alerts], {f"{s}:2" for s in streams})
    assert {a.event_id: a.frames for a in alerts if a.status == "closed"} == {
        f"{s}:2": list(range(2, 15)) for s in streams}  # neither event split by either takeover
    assert jsonl_rows(tmp_path, "b.jsonl"), "b delivered nothing: no takeover happened"
