"""Alert sink: k-of-n events, cool-down, de-duplication, reordering, outputs and the consume loop."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import (
    AlertMsg,
    DeadLetter,
    ScoreMsg,
    Telemetry,
    decode,
    encode,
)
from linewatch.sinks.alerts import (
    AlertPolicy,
    AlertTracker,
    BusOutput,
    JsonlOutput,
    OutputError,
    WebhookOutput,
)
from linewatch.sinks.runner import run_alert_sink

from helpers import STEP, TS0, read_all, score_msg, wait_for


def run(scores: list[ScoreMsg], policy: AlertPolicy | None = None, flush: bool = True) -> list[AlertMsg]:
    tracker = AlertTracker(lambda stream: policy or AlertPolicy())
    alerts = [a for s in scores for a in tracker.push(s)]
    return alerts + (tracker.flush() if flush else [])


def pattern(bits: str, **kwargs) -> list[ScoreMsg]:
    """'0110' -> seq 0..3 with scores 0.1 / 0.9 (threshold 0.5)."""
    return [score_msg(seq, 0.9 if bit == "1" else 0.1, **kwargs) for seq, bit in enumerate(bits)]


def summary(alerts: list[AlertMsg]) -> list[tuple]:
    return [(a.event_id, a.status, a.start_seq, a.end_seq, tuple(a.frames)) for a in alerts]


# ---- policy --------------------------------------------------------------------------------------------
def test_policy_validation_errors_are_clear():
    with pytest.raises(ValidationError, match="k=4 must not exceed n=3"):
        AlertPolicy(k=4, n=3)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        AlertPolicy(cooldown_s=-1)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AlertPolicy(k=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        AlertPolicy(treshold=0.5)


# ---- events --------------------------------------------------------------------------------------------
def test_k_of_n_opens_then_closes_after_n_normal_frames():
    scores = pattern("0110000000")
    tracker = AlertTracker(lambda stream: AlertPolicy(k=2, n=3))
    emitted = {s.frame.seq: tracker.push(s) for s in scores}
    assert [seq for seq, alerts in emitted.items() if alerts] == [2, 5]  # opens on the 2nd hit, closes 3 later
    opened, closed = emitted[2][0], emitted[5][0]
    assert (opened.status, opened.event_id, opened.frames) == ("open", "cam:1", [1, 2])
    assert (closed.status, closed.event_id, closed.start_seq, closed.end_seq) == ("closed", "cam:1", 1, 2)
    assert (closed.start_ts, closed.end_ts, closed.threshold) == (TS0 + STEP, TS0 + 2 * STEP, 0.5)
    assert tracker.flush() == []


def test_peak_and_its_telemetry():
    scores = pattern("0111")
    scores[2] = score_msg(2, 0.95, telemetry=Telemetry(latitude=47.1, longitude=8.5))
    closed = run(scores)[-1]
    assert (closed.status, closed.peak_seq, closed.peak_score, closed.telemetry.latitude) == ("closed", 2, 0.95, 47.1)


def test_single_spike_does_not_alert_but_two_within_n_do():
    assert run(pattern("0100100010")) == []  # hits 3+ frames apart: never 2 of the last 3
    assert summary(run(pattern("0101")))[0] == ("cam:1", "open", 1, 3, (1, 3))


def test_policy_threshold_overrides_the_workers():
    scores = [score_msg(seq, 0.7) for seq in range(4)]  # anomalous by the worker's threshold 0.5
    assert run(scores, AlertPolicy(threshold=0.8)) == []
    assert run(scores, AlertPolicy(threshold=0.6))[0].threshold == 0.6


def test_flush_closes_an_open_event():
    alerts = run(pattern("0011"), flush=False)
    assert [a.status for a in alerts] == ["open"]
    closed = run(pattern("0011"))[-1]
    assert (closed.status, closed.frames) == ("closed", [2, 3])


def test_cooldown_merges_a_retrigger_into_the_same_event():
    bits = "0110000011" + "0" * 20  # quiet at seq 5; re-fires at seq 9, 1 s of capture time later
    separate = run(pattern(bits), AlertPolicy(cooldown_s=0))
    assert summary(separate) == [("cam:1", "open", 1, 2, (1, 2)), ("cam:1", "closed", 1, 2, (1, 2)),
                                 ("cam:8", "open", 8, 9, (8, 9)), ("cam:8", "closed", 8, 9, (8, 9))]
    merged = run(pattern(bits), AlertPolicy(cooldown_s=2.0))
    assert summary(merged) == [("cam:1", "open", 1, 2, (1, 2)), ("cam:1", "closed", 1, 9, (1, 2, 8, 9))]


def test_cooldown_closes_after_its_capture_time_passes():
    tracker = AlertTracker(lambda stream: AlertPolicy(cooldown_s=2.0))
    emitted = {s.frame.seq: tracker.push(s) for s in pattern("011" + "0" * 15)}
    # quiet at seq 5 (3 normal frames after seq 2), closed 2 s = 8 frames later
    assert [(seq, a[0].status) for seq, a in emitted.items() if a] == [(2, "open"), (13, "closed")]


def test_a_lone_hit_during_cooldown_does_not_rearm():
    alerts = run(pattern("0110000100" + "0" * 10), AlertPolicy(cooldown_s=2.0))
    assert summary(alerts)[-1] == ("cam:1", "closed", 1, 2, (1, 2))


# ---- at-least-once input -------------------------------------------------------------------------------
def test_a_run_fed_twice_yields_its_events_once():
    scores = pattern("0110001110000")
    tracker = AlertTracker(lambda stream: AlertPolicy())
    first = [a for s in scores for a in tracker.push(s)]
    second = [a for s in scores for a in tracker.push(s)]
    assert len(first) == 4 and second == []
    assert (tracker.scores, tracker.duplicates) == (len(scores), len(scores))


def test_interleaved_duplicates_change_nothing():
    scores = pattern("0110001110000")
    doubled = [s for s in scores for _ in range(2)]
    assert summary(run(doubled)) == summary(run(scores))


def test_out_of_order_within_the_window_gives_the_same_events():
    scores = pattern("0110001110000011")
    shuffled = scores[:]
    rng = random.Random(7)
    for start in range(0, len(shuffled), 4):  # shuffle within blocks of 4 (< reorder_window)
        block = shuffled[start:start + 4]
        rng.shuffle(block)
        shuffled[start:start + 4] = block
    assert shuffled != scores
    assert summary(run(shuffled)) == summary(run(scores))


def test_a_gap_does_not_stall_the_stream():
    scores = [s for s in pattern("0" * 10 + "11" + "0" * 10) if s.frame.seq != 5]  # seq 5 was dead-lettered
    tracker = AlertTracker(lambda stream: AlertPolicy(reorder_window=4))
    opened = [(s.frame.seq, a) for s in scores for a in tracker.push(s)]
    assert [(seq, a.status, a.event_id) for seq, a in opened] == [(11, "open", "cam:10"), (14, "closed", "cam:10")]
    assert tracker.push(score_msg(5, 0.9)) == [] and tracker.late == 1  # too late: it was given up on
    assert tracker.buffered() == set()


def test_streams_are_independent():
    a, b = pattern("0110000", stream="a"), pattern("0001100", stream="b")
    mixed = [s for pair in zip(a, b) for s in pair]
    assert sorted(summary(run(mixed))) == sorted(summary(run(a)) + summary(run(b)))


def test_idle_streams_are_flushed():
    now = [0.0]
    tracker = AlertTracker(lambda stream: AlertPolicy(), clock=lambda: now[0])
    for s in pattern("0011"):
        tracker.push(s)
    assert tracker.flush_idle(5.0) == []
    now[0] = 6.0
    assert [a.status for a in tracker.flush_idle(5.0)] == ["closed"]
    assert tracker.flush_idle(5.0) == []


# ---- outputs -------------------------------------------------------------------------------------------
def test_jsonl_output_never_writes_an_alert_twice_across_restarts(tmp_path):
    path = tmp_path / "out" / "alerts.jsonl"
    alerts = run(pattern("0110000"))
    first = JsonlOutput(path)
    assert [first.write(a) for a in alerts] == [True, True]
    first.close()
    with path.open("ab") as torn:  # a crash mid-line
        torn.write(b'{"event_id": "cam:9", "sta')
    again = JsonlOutput(path)  # restart, replay of the same frames, then a new event
    assert [again.write(a) for a in alerts] == [False, False]
    assert again.write(run(pattern("0000000011"))[0]) is True
    again.close()
    lines = path.read_bytes().splitlines()
    rows = [json.loads(line) for line in lines if line.endswith(b"}")]
    assert [(r["event_id"], r["status"]) for r in rows] == [("cam:1", "open"), ("cam:1", "closed"), ("cam:8", "open")]
    assert decode(lines[0], AlertMsg).frames == [1, 2]


def test_bus_output_publishes_keyed_by_stream():
    bus = MemoryBus()
    reader = bus.consumer([bus.topics.alerts], "reader")
    output = BusOutput(bus.producer(), bus.topics.alerts)
    for alert in run(pattern("011")):
        output.write(alert)
    output.flush()
    records = reader.poll(1.0)
    assert [(r.key, decode(r.value, AlertMsg).status) for r in records] == [(b"cam", "open"), (b"cam", "closed")]


class _Webhook:
    """A real HTTP server on loopback; ``statuses`` are answered in turn, the last one repeats."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.bodies = statuses, []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                hook.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status = hook.statuses[min(len(hook.bodies), len(hook.statuses)) - 1]
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    servers = []

    def start(statuses):
        servers.append(_Webhook(statuses))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_webhook_retries_until_delivered(webhook):
    hook = webhook([503, 503, 200])
    alert = run(pattern("011"))[0]
    assert WebhookOutput(hook.url, retries=5, backoff_s=0.01).write(alert) is True
    assert len(hook.bodies) == 3
    assert decode(hook.bodies[-1], AlertMsg).event_id == "cam:1"


def test_webhook_gives_up_with_a_clear_error(webhook):
    hook = webhook([503])
    alert = run(pattern("011"))[0]
    with pytest.raises(OutputError, match=r"cam:1 \(open\) not delivered after 3 attempt\(s\); last error: HTTP 503"):
        WebhookOutput(hook.url, retries=2, backoff_s=0.01).write(alert)
    assert len(hook.bodies) == 3


def test_webhook_stops_retrying_at_shutdown(webhook):
    hook = webhook([503])
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(OutputError, match="stopped while retrying"):  # the runner dead-letters it
        WebhookOutput(hook.url, retries=10, backoff_s=0.1, stop=stop).write(run(pattern("011"))[0])
    assert 1 <= len(hook.bodies) <= 3  # not the 11 attempts (~100 s) it would otherwise make


def test_webhook_does_not_retry_a_client_error(webhook):
    hook = webhook([400])
    with pytest.raises(OutputError, match="refused alert cam:1 .*HTTP 400"):
        WebhookOutput(hook.url, retries=5, backoff_s=0.01).write(run(pattern("011"))[0])
    assert len(hook.bodies) == 1


def test_webhook_unreachable_is_retried_then_fails(webhook):
    hook = webhook([200])
    url = hook.url
    hook.close()  # nothing listens there any more
    with pytest.raises(OutputError, match=r"after 2 attempt\(s\)"):
        WebhookOutput(url, retries=1, backoff_s=0.01, timeout_s=1).write(run(pattern("011"))[0])
    with pytest.raises(ValueError, match="http"):
        WebhookOutput("ftp://example.org/x")


# ---- the consume loop ----------------------------------------------------------------------------------
def test_alert_sink_end_to_end(tmp_path, webhook):
    bus = MemoryBus(partitions=2)
    producer = bus.producer()
    scores = pattern("0110000011", stream="cam-a") + pattern("00111", stream="cam-b")
    for s in scores + scores[:4]:  # cam-a's first frames delivered twice
        producer.send(bus.topics.scores, encode(s), key=s.frame.stream.encode())
    producer.send(bus.topics.scores, b"\x00 not json", key=b"cam-a")
    hook = webhook([500])  # a webhook that is down: its alerts are dead-lettered, the rest goes on
    jsonl = tmp_path / "alerts.jsonl"
    outputs = [JsonlOutput(jsonl), WebhookOutput(hook.url, retries=1, backoff_s=0.01)]
    stop, result = threading.Event(), {}
    sink = threading.Thread(target=lambda: result.update(stats=run_alert_sink(
        bus, lambda stream: AlertPolicy(), outputs, stop=stop, idle_flush_s=0.3, poll_s=0.05)))
    sink.start()

    def written():
        return [(r["event_id"], r["status"]) for r in map(json.loads, jsonl.read_text().splitlines())]

    # cam-b's event and cam-a's second one close when the streams go idle
    expected = {("cam-a:1", "open"), ("cam-a:1", "closed"), ("cam-a:8", "open"), ("cam-a:8", "closed"),
                ("cam-b:2", "open"), ("cam-b:2", "closed")}
    wait_for(lambda: jsonl.exists() and set(written()) == expected)
    stop.set()
    sink.join(10)
    stats = result["stats"]
    assert sorted(written()) == sorted(expected)  # each once
    assert (stats.scores, stats.duplicates, stats.alerts) == (len(scores) + 4, 4, 6)
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert sorted(d.stage for d in dead) == ["sink-alerts"] * 7 and stats.dead == 7
    garbage = [d for d in dead if d.origin is not None]
    assert len(garbage) == 1 and garbage[0].payload == b"\x00 not json" and "not JSON" in garbage[0].reason
    assert {d.stream for d in dead} == {"cam-a", "cam-b"}
    assert all("WebhookOutput" in d.reason for d in dead if d.origin is None)
    committed = bus.committed["linewatch-alerts"]
    assert sum(committed.values()) == len(scores) + 5  # everything, the garbage included

    # a replay of every score (a fresh bus, a restarted sink) into the same file writes nothing new
    replay = MemoryBus()
    for s in scores:
        replay.producer().send(replay.topics.scores, encode(s), key=s.frame.stream.encode())
    stop = threading.Event()
    sink = threading.Thread(target=run_alert_sink, args=(replay, lambda stream: AlertPolicy(), [JsonlOutput(jsonl)]),
                            kwargs={"stop": stop, "poll_s": 0.05})
    sink.start()
    wait_for(lambda: sum(replay.committed.get("linewatch-alerts", {}).values()) == len(scores))
    stop.set()  # closes cam-a:8 and cam-b:2 again on the way out: already in the file
    sink.join(10)
    assert sorted(written()) == sorted(expected)


def test_a_stream_joined_midway_waits_for_the_window_then_starts_at_its_lowest_seq():
    scores = [s for s in pattern("0" * 100 + "0110000000")][100:]  # the sink restarted at seq ~100
    scores[0], scores[1] = scores[1], scores[0]  # 101 arrives before 100
    tracker = AlertTracker(lambda stream: AlertPolicy(reorder_window=4))
    emitted = [(s.frame.seq, a.status, a.event_id) for s in scores for a in tracker.push(s)]
    assert emitted == [(104, "open", "cam:101"), (105, "closed", "cam:101")]  # held until 5 were buffered
    assert tracker.duplicates == tracker.late == 0
