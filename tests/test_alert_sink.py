"""The alert sink's consume loop on the in-process bus: state that survives a restart, a crash
between its steps and a second instance taking partitions over; outputs that hold up nothing
(a webhook that never answers), backpressure, and records that are dead-lettered."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from linewatch.bus import partition_for
from linewatch.bus.memory import MemoryBus, MemoryConsumer
from linewatch.bus.messages import AlertMsg, DeadLetter, ScoreMsg, SessionEnd, decode, encode
from linewatch.sinks.alert_sink import AlertSink
from linewatch.sinks.alert_state import AlertStore, state_topic
from linewatch.sinks.events import AlertPolicy, AlertTracker, StreamState
from linewatch.sinks.channels import DeliveryPolicy
from linewatch.sinks.channels.jsonl import JsonlOutput
from linewatch.sinks.channels.webhook import WebhookOutput

from helpers import read_all, score_msg, wait_for

GROUP = "linewatch-alerts"


def pattern(bits: str, stream: str = "cam", start: int = 0) -> list[ScoreMsg]:
    return [score_msg(start + i, 0.9 if bit == "1" else 0.1, stream=stream) for i, bit in enumerate(bits)]


def end(stream: str, frames: int) -> SessionEnd:
    return SessionEnd(stream=stream, frames=frames, ts=2000.0)


def send(bus, messages) -> int:
    producer = bus.producer()
    for m in messages:
        value = m if isinstance(m, bytes) else encode(m)
        stream = m.frame.stream if isinstance(m, ScoreMsg) else getattr(m, "stream", "cam")
        producer.send(bus.topics.scores, value, key=stream.encode())
    return len(messages)


def new_bus(**options) -> MemoryBus:
    """An in-process bus that keeps every alert on the topic: a group that never commits (the
    bus drops what every group reading a topic has committed)."""
    bus = MemoryBus(**options)
    bus.consumer([bus.topics.alerts], "witness")
    bus.unpaced("witness")
    return bus


def committed(bus) -> int:
    with bus.cond:
        return sum(bus.committed.get(GROUP, {}).values())


def jsonl(path) -> list[tuple[str, str]]:
    return [(r["event_id"], r["status"]) for r in map(json.loads, path.read_text().splitlines())] if path.exists() else []


def on_topic(bus) -> list[tuple[str, str]]:
    return [(a.event_id, a.status) for a in (decode(r.value, AlertMsg) for r in read_all(bus, bus.topics.alerts))]


def dead_letters(bus) -> list[DeadLetter]:
    return [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]


class Running:
    """An AlertSink in a thread."""

    def __init__(self, bus, outputs, policy: AlertPolicy | None = None, **options):
        self.sink = AlertSink(bus, lambda stream: policy or AlertPolicy(), outputs, poll_s=0.05, **options)
        self.stop, self.errors, self.stats = threading.Event(), [], None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.stats = self.sink.run(self.stop)
        except BaseException as err:  # noqa: BLE001 - the test looks
            self.errors.append(err)

    def close(self):
        self.stop.set()
        self.thread.join(30)  # a liveness bound
        assert not self.thread.is_alive()
        return self.stats


def outputs(bus, path):
    """The JSONL channel (the alerts topic is the sink's own output)."""
    return [JsonlOutput(path)]


def retrying(output, attempts: int):
    output.delivery = DeliveryPolicy(attempts=attempts, backoff_s=0.01, max_backoff_s=0.05)
    return output


def exactly_once(rows: list[tuple[str, str]]) -> set[str]:
    """Each event opened and closed exactly once; returns the event ids."""
    counts = Counter(rows)
    assert all(n == 1 for n in counts.values()), counts
    events = {event for event, _ in rows}
    assert {(e, s) for e in events for s in ("open", "closed")} == set(rows), rows
    return events


# ---- the loop ------------------------------------------------------------------------------------------
def test_alert_sink_end_to_end(tmp_path, webhook):
    bus = new_bus(partitions=2)
    a, b = pattern("0110000011", stream="cam-a"), pattern("00111", stream="cam-b")
    total = send(bus, a + a[:4] + b + [b"\x00 not json", end("cam-a", 10), end("cam-b", 5)])  # cam-a's first frames twice
    hook = webhook([500])  # a webhook that is down: its alerts are dead-lettered, the rest goes on
    down = retrying(WebhookOutput(hook.url), attempts=2)
    path = tmp_path / "alerts.jsonl"
    running = Running(bus, [JsonlOutput(path), down])
    wait_for(lambda: committed(bus) == total and running.sink.delivered())
    stats = running.close()
    # cam-a's second event and cam-b's event close on their sessions' end markers
    assert exactly_once(jsonl(path)) == {"cam-a:1", "cam-a:8", "cam-b:2"}
    assert (stats.scores, stats.ends, stats.duplicates, stats.alerts) == (len(a) + 4 + len(b), 2, 4, 6)
    dead = dead_letters(bus)
    assert sorted(d.stage for d in dead) == ["sink-alerts"] * 7 and stats.dead == 7
    (garbage,) = [d for d in dead if d.origin is not None]
    assert garbage.payload == b"\x00 not json" and "not JSON" in garbage.reason
    assert all("webhook" in d.reason and "2 attempt(s)" in d.reason for d in dead if d.origin is None)
    assert stats.delivered == {"jsonl": 6, "webhook": 0}


def test_a_stopped_sink_leaves_its_events_open_and_a_new_one_resumes_them(tmp_path):
    """SIGTERM mid-event: no "closed" on the way out. The next sink (same group, a fresh
    process in real life) restores the event and closes it once; the same defect is not
    alerted again under a new id."""
    bus, path = new_bus(partitions=2), tmp_path / "alerts.jsonl"
    scores = pattern("0011111111" + "11100000")
    sent = send(bus, scores[:10])
    first = Running(bus, outputs(bus, path))
    wait_for(lambda: committed(bus) == sent and first.sink.delivered())
    first.close()
    assert jsonl(path) == on_topic(bus) == [("cam:2", "open")]
    sent += send(bus, scores[10:] + [end("cam", len(scores))])
    second = Running(bus, outputs(bus, path))
    wait_for(lambda: committed(bus) == sent and second.sink.delivered())
    second.close()
    assert exactly_once(jsonl(path)) == {"cam:2"} and exactly_once(on_topic(bus)) == {"cam:2"}
    closed = decode(read_all(bus, bus.topics.alerts)[-1].value, AlertMsg)
    assert closed.frames == list(range(2, 13))  # one event, the frames of both sinks' parts


@pytest.mark.parametrize("step", ["in the write", "after the write", "at the commit"])
def test_a_crash_between_the_checkpoints_steps_raises_nothing_twice(tmp_path, monkeypatch, step):
    """Write-ahead: the state and the pending alerts are acknowledged before the alerts go to
    the outputs and before the offsets are committed. A sink that dies in the write has
    committed nothing (its records are redone as new); one that dies after it leaves state
    ahead of the offsets (the next one redoes those records as duplicates and delivers what
    is still pending). Either way: every alert once."""
    bus, path = new_bus(), tmp_path / "alerts.jsonl"
    scores = pattern("00111100000")
    sent = send(bus, scores + [end("cam", len(scores))])

    class Crash(BaseException):
        pass

    real_write = AlertStore.write

    def write_then_crash(self, states, pending):
        if step == "after the write":
            real_write(self, states, pending)
        if pending:
            raise Crash()

    real_commit = MemoryConsumer.commit

    def crash(self, records):  # the sink's commit (the channels commit on their own)
        if self.group == GROUP:
            raise Crash()
        real_commit(self, records)

    if step == "at the commit":
        monkeypatch.setattr(MemoryConsumer, "commit", crash)
    else:
        monkeypatch.setattr(AlertStore, "write", write_then_crash)
    crashing = Running(bus, outputs(bus, path))
    crashing.thread.join(30)
    assert isinstance(crashing.errors[0], Crash) and committed(bus) == 0
    monkeypatch.undo()
    restarted = Running(bus, outputs(bus, path))
    wait_for(lambda: committed(bus) == sent and restarted.sink.delivered())
    stats = restarted.close()
    assert exactly_once(jsonl(path)) == exactly_once(on_topic(bus)) == {"cam:2"}
    if step == "in the write":  # nothing was written: redone as new
        assert stats.alerts == 2 and stats.duplicates == 0
    else:  # the state was ahead of the offsets: redone as duplicates, nothing raised again
        assert stats.alerts == 0 and stats.duplicates == len(scores) + 1


def test_a_second_sink_takes_over_partitions_mid_event(tmp_path):
    """Two streams on two partitions, both mid-event in sink A. Sink B joins the group and
    gets one partition (restoring its state); later A leaves and B owns both. Across the two
    sinks' files every event is opened and closed exactly once, and the alerts topic too."""
    bus = new_bus(partitions=2)
    streams = ["cam-0", "cam-4"]
    assert {partition_for(s.encode(), 2) for s in streams} == {0, 1}
    scores = {s: pattern("0011111111111100000", stream=s) for s in streams}
    sent = send(bus, [m for s in streams for m in scores[s][:8]])
    a_path, b_path = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = Running(bus, outputs(bus, a_path))
    wait_for(lambda: committed(bus) == sent and a.sink.delivered())
    b = Running(bus, outputs(bus, b_path))
    wait_for(lambda: b.sink.tracker.streams, what="B to take over a partition and restore its stream")
    sent += send(bus, [m for s in streams for m in scores[s][8:14]])
    wait_for(lambda: committed(bus) == sent and a.sink.delivered() and b.sink.delivered())
    a.close()  # B takes both partitions
    sent += send(bus, [m for s in streams for m in [*scores[s][14:], end(s, 19)]])
    wait_for(lambda: committed(bus) == sent and b.sink.delivered())
    b.close()
    both = jsonl(a_path) + jsonl(b_path)
    assert exactly_once(both) == exactly_once(on_topic(bus)) == {"cam-0:2", "cam-4:2"}
    assert jsonl(b_path), "B delivered nothing: the takeover was not exercised"
    frames = {a.event_id: a.frames for a in map(lambda r: decode(r.value, AlertMsg), read_all(bus, bus.topics.alerts))
              if a.status == "closed"}
    assert frames == {f"{s}:2": list(range(2, 14)) for s in streams}  # not split by the takeover


# ---- channels -------------------------------------------------------------------------------------------
def test_a_webhook_that_never_answers_holds_up_no_other_output_and_no_stream(tmp_path, webhook):
    """The webhook holds its first request unanswered (its client waits longer than the test).
    Meanwhile the file and the topic receive every alert of both streams, in order, and every
    offset is committed; the webhook is still on its first alert. Once it answers, it gets
    them all, in order. No event is split."""
    answer = threading.Event()
    hook = webhook([200], answer=answer)
    bus, path = new_bus(partitions=2), tmp_path / "alerts.jsonl"
    stream_scores = {s: pattern("00111100000111110000", stream=s) for s in ("cam-0", "cam-4")}
    messages = [m for pair in zip(*stream_scores.values()) for m in pair] + [end(s, 20) for s in stream_scores]
    sent = send(bus, messages)
    slow = WebhookOutput(hook.url, timeout_s=600)
    running = Running(bus, [*outputs(bus, path), slow])
    expected = [(f"{s}:{start}", status) for s in stream_scores for start in (2, 11) for status in ("open", "closed")]
    wait_for(lambda: committed(bus) == sent and sorted(jsonl(path)) == sorted(expected)
             and sorted(on_topic(bus)) == sorted(expected) and hook.bodies)  # the webhook's first request arrived
    first = decode(hook.bodies[0], AlertMsg)
    assert {(decode(body, AlertMsg).event_id, decode(body, AlertMsg).status) for body in hook.bodies} == {
        (first.event_id, "open")}  # still retrying (here: waiting on) its first alert
    for rows in (jsonl(path), on_topic(bus)):
        for stream in stream_scores:  # each stream's alerts in order
            assert [r for r in rows if r[0].startswith(stream)] == [r for r in expected if r[0].startswith(stream)]
    answer.set()
    wait_for(lambda: len(hook.bodies) == len(expected) and running.sink.delivered())
    running.close()
    posted = [(a.event_id, a.status) for a in (decode(body, AlertMsg) for body in hook.bodies)]
    assert sorted(posted) == sorted(expected) and posted[0] == (first.event_id, "open")
    for stream in stream_scores:
        assert [r for r in posted if r[0].startswith(stream)] == [r for r in expected if r[0].startswith(stream)]


def test_alerts_still_pending_at_a_stop_are_delivered_by_the_next_run_once(tmp_path, webhook):
    hook = webhook([503])
    bus, path = new_bus(), tmp_path / "alerts.jsonl"
    sent = send(bus, pattern("0110000") + [end("cam", 7)])
    first = Running(bus, [JsonlOutput(path), retrying(WebhookOutput(hook.url), attempts=1000)])
    wait_for(lambda: committed(bus) == sent and len(hook.bodies) > 3)
    first.close()  # stops retrying; not a dead letter: still on the webhook's backlog
    assert not dead_letters(bus) and jsonl(path) == [("cam:1", "open"), ("cam:1", "closed")]
    up = webhook([200])
    second = Running(bus, [JsonlOutput(path), WebhookOutput(up.url)])
    wait_for(lambda: len(up.bodies) == 2 and second.sink.delivered())
    second.close()
    assert [(decode(b, AlertMsg).event_id, decode(b, AlertMsg).status) for b in up.bodies] == jsonl(path)
    assert len(jsonl(path)) == 2  # the file's were delivered before: not again


# ---- records that cannot be handled --------------------------------------------------------------------
def test_any_failure_on_one_record_dead_letters_it_and_the_loop_goes_on(tmp_path, monkeypatch):
    bus, path = new_bus(), tmp_path / "alerts.jsonl"
    scores = pattern("0110000011000")
    infinite = encode(score_msg(3, 0.9)).replace(b'"ts":1000.75', b'"ts":1e999')  # JSON reads it as inf
    assert b"1e999" in infinite
    sent = send(bus, scores[:5] + [infinite] + scores[5:] + [end("cam", 13)])
    real_push = AlertTracker.push

    def push(self, score, partition=0):  # a bug that strikes one record
        if score.frame.seq == 6:
            raise KeyError("boom")
        return real_push(self, score, partition)

    monkeypatch.setattr(AlertTracker, "push", push)
    running = Running(bus, outputs(bus, path))
    wait_for(lambda: committed(bus) == sent and running.sink.delivered())
    stats = running.close()
    assert exactly_once(jsonl(path)) == {"cam:1", "cam:8"}  # the loop went on past both
    dead = dead_letters(bus)
    # the infinite capture time is refused by the schema, before its seq is known (the key names the stream)
    assert [(d.stage, d.stream, d.seq, d.origin.offset) for d in dead] == [("sink-alerts", "cam", None, 5),
                                                                           ("sink-alerts", "cam", 6, 7)]
    assert "finite number" in dead[0].reason and dead[1].reason == "KeyError: 'boom'" and stats.dead == 2


def test_a_corrupt_state_record_is_dead_lettered_and_the_stream_starts_afresh(tmp_path):
    bus, path = new_bus(), tmp_path / "alerts.jsonl"
    topic = state_topic(bus.topics.scores, GROUP)
    bus.ensure_topics([topic], partitions=1, compact=True)
    bus.producer().send(topic, b'{"v": 1, "epoch": 0, "state": {"stream": 5}}', key=b"state/cam", partition=0)
    sent = send(bus, pattern("0110000") + [end("cam", 7)])
    running = Running(bus, outputs(bus, path))
    wait_for(lambda: committed(bus) == sent and running.sink.delivered())
    running.close()
    assert exactly_once(jsonl(path)) == {"cam:1"}
    (dead,) = dead_letters(bus)
    assert dead.stage == "sink-alerts" and "does not parse" in dead.reason and dead.origin.topic == topic


# ---- the changelog ----------------------------------------------------------------------------------------
def test_a_zombies_late_writes_are_fenced_off_also_after_compaction():
    """Sink A lost partition 0 to sink B without noticing and writes on, after B. A third
    reader takes B's records and ignores A's late ones, also for a key B never wrote, and
    also once compaction has kept only the last record of each key."""
    bus = new_bus(capacity=2)  # a changelog longer than 2 records is compacted on every write
    topic = "t.state"
    zombie, owner = AlertStore(bus, topic, 1), AlertStore(bus, topic, 1)
    zombie.restore({0})
    owner.restore({0})
    owner.write([StreamState(stream="x", partition=0, sessions={"new": {}})], [])
    zombie.write([StreamState(stream="x", partition=0, sessions={"old": {}}),
                  StreamState(stream="y", partition=0)], [])
    states = {s.stream: s for s in AlertStore(bus, topic, 1).restore({0}).states}
    assert list(states) == ["x"] and list(states["x"].sessions) == ["new"]


def test_a_sink_that_does_not_publish_feeds_its_channels_from_a_topic_of_its_own(tmp_path):
    """``alerts.publish`` off (a replay's sink): nothing on the shared alerts topic, the JSONL
    channel still gets every alert, through the sink's own alerts topic."""
    bus, path = new_bus(), tmp_path / "alerts.jsonl"
    sent = send(bus, pattern("0110000") + [end("cam", 7)])
    running = Running(bus, outputs(bus, path), publish=False)
    wait_for(lambda: committed(bus) == sent and running.sink.delivered())
    running.close()
    assert exactly_once(jsonl(path)) == {"cam:1"} and on_topic(bus) == []
    assert running.sink.alerts_topic == f"{bus.topics.scores}.{GROUP}.alerts"
