"""Alert channels (JSONL, a webhook) and their delivery as consumers of the alerts topic: one
attempt per send, retries with backoff, refusal, "unknown", maximum age, dead-lettering."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import AlertMsg, decode, encode
from linewatch.ops import metrics
from linewatch.ops.health import Health
from linewatch.sinks.events import AlertPolicy, AlertTracker
from linewatch.sinks.delivery import Channel
from linewatch.sinks.channels import AlertChannel, DeliveryPolicy, OutputError, OutputRefused, OutputUnknown
from linewatch.sinks.channels.jsonl import JsonlOutput
from linewatch.sinks.channels.webhook import WebhookOutput

from helpers import score_msg, wait_for


def alerts(bits: str = "0110000", stream: str = "cam") -> list[AlertMsg]:
    tracker = AlertTracker(lambda s: AlertPolicy())
    return [a for seq, bit in enumerate(bits) for a in tracker.push(score_msg(seq, 0.9 if bit == "1" else 0.1,
                                                                            stream=stream))]


class Scripted(AlertChannel):
    """An output whose attempts fail as scripted (an exception class, or None for success); it
    can be held inside an attempt until ``release`` is set."""

    name = "scripted"

    def __init__(self, script=(), release: threading.Event | None = None):
        self.script, self.release = list(script), release
        self.attempts: list[str] = []
        self.entered = threading.Event()

    def send(self, alert):
        self.attempts.append(f"{alert.event_id}/{alert.status}")
        self.entered.set()
        if self.release is not None:
            self.release.wait()
        failure = self.script.pop(0) if self.script else None
        if failure is not None:
            raise failure("scripted failure")


# ---- the outputs: one attempt each ---------------------------------------------------------------------
def test_jsonl_output_never_writes_an_alert_twice_across_restarts(tmp_path):
    path = tmp_path / "out" / "alerts.jsonl"
    opened_and_closed = alerts()
    first = JsonlOutput(path)
    for alert in opened_and_closed:
        first.send(alert)
    first.close()
    with path.open("ab") as torn:  # a crash mid-line
        torn.write(b'{"event_id": "cam:9", "sta')
    again = JsonlOutput(path)  # restarted: the same alerts again (not recorded as delivered), then a new one
    for alert in opened_and_closed + alerts("0000000011"):
        again.send(alert)
    again.close()
    lines = path.read_bytes().splitlines()
    rows = [json.loads(line) for line in lines if line.endswith(b"}")]
    assert [(r["event_id"], r["status"]) for r in rows] == [("cam:1", "open"), ("cam:1", "closed"), ("cam:8", "open")]
    assert decode(lines[0], AlertMsg).frames == [1, 2]


def test_webhook_posts_once_per_send_with_an_idempotency_key(webhook):
    hook = webhook([200, 503, 429, 400])
    output = WebhookOutput(hook.url)
    alert = alerts()[0]
    output.send(alert)
    with pytest.raises(OutputError, match="HTTP 503") as busy:
        output.send(alert)
    assert not isinstance(busy.value, OutputRefused)
    with pytest.raises(OutputError, match="HTTP 429") as throttled:
        output.send(alert)
    assert not isinstance(throttled.value, OutputRefused)
    with pytest.raises(OutputRefused, match="HTTP 400"):
        output.send(alert)
    headers, body = hook.requests[0]
    assert len(hook.requests) == 4 and decode(body, AlertMsg) == alert
    assert headers["Idempotency-Key"] == "cam:1/open" and headers["Content-Type"] == "application/json"


def test_webhook_unreachable_is_an_error_worth_retrying(webhook):
    hook = webhook([200])
    url = hook.url
    hook.close()  # nothing listens there any more
    with pytest.raises(OutputError) as unreachable:
        WebhookOutput(url, timeout_s=1).send(alerts()[0])
    assert not isinstance(unreachable.value, (OutputRefused, OutputUnknown))  # refused: surely not delivered
    with pytest.raises(ValueError, match="http"):
        WebhookOutput("ftp://example.org/x")


def test_a_webhook_that_answers_too_late_may_have_the_alert(webhook):
    answer = threading.Event()
    hook = webhook([200], answer=answer)
    try:
        with pytest.raises(OutputUnknown, match="no answer after sending"):
            WebhookOutput(hook.url, timeout_s=0.2).send(alerts()[0])
    finally:
        answer.set()
    assert len(hook.requests) == 1


# ---- a channel: its own consumer of the alerts topic, retries, dead letters ----------------------------------
class Dead:
    """The channel's dead-letter callback, recorded."""

    def __init__(self):
        self.letters: list[tuple[str, AlertMsg | None]] = []

    def __call__(self, reason, alert, record):
        self.letters.append((reason, alert))


def channel(output: AlertChannel, bus: MemoryBus | None = None, **policy) -> tuple[Channel, Dead, MemoryBus, threading.Event]:
    bus = bus or MemoryBus()
    output.delivery = DeliveryPolicy(**{"backoff_s": 0.01, "max_backoff_s": 0.05, **policy})
    dead, stop = Dead(), threading.Event()
    running = Channel(bus, output, bus.topics.alerts, dead, poll_s=0.05)
    running.start(stop)
    return running, dead, bus, stop


def publish(bus: MemoryBus, alerts_: list[AlertMsg], timestamp_ms: int | None = None) -> None:
    producer = bus.producer()
    for alert in alerts_:
        producer.send(bus.topics.alerts, encode(alert), key=alert.stream.encode(), timestamp_ms=timestamp_ms)


def group_committed(bus: MemoryBus, running: Channel) -> int:
    with bus.cond:
        return sum(bus.committed.get(running.group, {}).values())


def test_a_channel_retries_until_delivered_and_commits_after():
    output = Scripted([OutputError, OutputError])
    running, dead, bus, stop = channel(output)
    publish(bus, alerts())
    wait_for(running.caught_up)
    stop.set()
    running.join()
    assert output.attempts == ["cam:1/open"] * 3 + ["cam:1/closed"] and not dead.letters
    assert group_committed(bus, running) == 2 and running.delivered == 2


def test_a_channel_gives_up_after_its_attempts_says_so_and_goes_on(caplog):
    output = Scripted([OutputError] * 2 + [RuntimeError])
    with caplog.at_level(logging.INFO, logger="linewatch.sinks.delivery"):
        running, dead, bus, stop = channel(output, attempts=3)
        publish(bus, alerts())
        wait_for(running.caught_up)
        stop.set()
        running.join()
    ((reason, alert),) = dead.letters
    assert alert.event_id == "cam:1" and alert.status == "open"
    assert "not delivered; gave up after 3 attempt(s)" in reason and "RuntimeError: scripted failure" in reason
    assert output.attempts[-1] == "cam:1/closed" and running.delivered == 1
    failing = [r.message for r in caplog.records if "is failing" in r.message]
    assert len(failing) == 1 and sum("works again" in r.message for r in caplog.records) == 1  # once per outage


def test_an_attempt_without_an_answer_makes_the_dead_letter_say_may_have_been_delivered():
    output = Scripted([OutputError, OutputUnknown, OutputError])
    running, dead, bus, stop = channel(output, attempts=3)
    publish(bus, alerts()[:1])
    wait_for(lambda: dead.letters)
    stop.set()
    running.join()
    ((reason, _),) = dead.letters
    assert "may have been delivered" in reason and "3 attempt(s)" in reason and "not delivered" not in reason


def test_a_refused_alert_is_not_retried():
    output = Scripted([OutputRefused])
    running, dead, bus, stop = channel(output)
    publish(bus, alerts())
    wait_for(running.caught_up)
    stop.set()
    running.join()
    assert output.attempts == ["cam:1/open", "cam:1/closed"]
    ((reason, _),) = dead.letters
    assert "refused after 1 attempt(s)" in reason


def test_an_alert_older_than_max_age_is_dead_lettered_instead_of_sent():
    output = Scripted()
    running, dead, bus, stop = channel(output, max_age_s=60)
    publish(bus, alerts()[:1], timestamp_ms=int((time.time() - 3600) * 1000))  # decided an hour ago
    publish(bus, alerts()[1:])
    wait_for(running.caught_up)
    stop.set()
    running.join()
    assert output.attempts == ["cam:1/closed"]
    ((reason, alert),) = dead.letters
    assert alert.status == "open" and "older than max_age_s" in reason and "after 0 attempt(s)" in reason


def test_a_stop_mid_retries_leaves_the_alert_for_the_next_run_and_duplicates_are_skipped():
    output = Scripted([OutputError] * 1000)
    running, dead, bus, stop = channel(output, attempts=0, backoff_s=60.0, max_backoff_s=60.0)
    publish(bus, alerts())
    wait_for(lambda: output.attempts)
    stop.set()
    running.join()  # a liveness check: returns at once, not after a minute of backoff
    assert group_committed(bus, running) == 0 and not dead.letters
    again = Scripted()
    rerun, dead, _, stop = channel(again, bus)
    publish(bus, alerts())  # the same alerts published once more (a sink killed before its tombstones)
    wait_for(rerun.caught_up)
    stop.set()
    rerun.join()
    assert again.attempts == ["cam:1/open", "cam:1/closed"] and not dead.letters


def test_a_channel_that_is_down_holds_no_producer_of_the_in_process_bus_back():
    """MemoryBus paces a producer by its consumer groups, but not by a channel's."""
    output = Scripted([OutputError] * 10_000)
    running, dead, bus, stop = channel(output, MemoryBus(capacity=4), attempts=0)
    many = [a for i in range(10) for a in alerts("0110000", stream=f"cam-{i}")]  # 20 alerts, capacity 4
    publish(bus, many)  # returns: nothing waits for the channel
    with bus.cond:
        assert bus.logs[bus.topics.alerts][0].end == 20
    lag = metrics.CHANNEL_LAG.labels(running.name)
    wait_for(lambda: lag._value.get() == 20, what="the channel's lag metric to count its backlog")
    stop.set()
    running.join()


def test_a_channel_added_later_takes_the_alerts_from_then_on_and_keeps_its_backlog_across_runs():
    bus = MemoryBus()
    bus.consumer([bus.topics.alerts], "witness")  # keeps the history on the in-process bus
    publish(bus, alerts(stream="history"))  # decided before the channel existed
    first = Scripted([OutputError] * 1000)
    running, _, _, stop = channel(first, bus, attempts=0)
    publish(bus, alerts(stream="new"))
    wait_for(lambda: first.attempts)
    stop.set()
    running.join()
    assert set(first.attempts) == {"new:1/open"}  # never the history
    again = Scripted()
    rerun, dead, _, stop = channel(again, bus)  # the next run: its backlog, still not the history
    wait_for(rerun.caught_up)
    stop.set()
    rerun.join()
    assert again.attempts == ["new:1/open", "new:1/closed"] and not dead.letters


def test_a_channel_that_dies_makes_healthz_fail_and_one_stopped_on_purpose_does_not(caplog):
    """The channel's thread beats ``channel-<name>``; a bug that kills it (here: its consumer's
    poll raising) leaves the beat to age past its bound, so liveness fails; a stop removes it."""
    clock = [0.0]
    health = Health(clock=lambda: clock[0])
    bus, dead, stop = MemoryBus(), Dead(), threading.Event()
    output = Scripted([])
    output.delivery = DeliveryPolicy(timeout_s=1.0, max_backoff_s=2.0)
    running = Channel(bus, output, bus.topics.alerts, dead, poll_s=0.05, health=health)
    running.start(stop)
    wait_for(lambda: f"channel-{output.name}" in health.liveness()[1]["loops"])
    with caplog.at_level(logging.ERROR, logger="linewatch.sinks.delivery"):
        running.consumer.poll = lambda *args: (_ for _ in ()).throw(RuntimeError("a bug"))
        wait_for(lambda: not running.thread.is_alive())
    assert "alert channel scripted stopped" in caplog.text
    assert health.liveness()[0]  # within its bound
    clock[0] += running.bound_s + 1
    alive, detail = health.liveness()
    assert not alive and detail["loops"]["channel-scripted"]["alive"] is False

    again, stop_again = Channel(bus, output, bus.topics.alerts, dead, poll_s=0.05, health=Health()), threading.Event()
    again.start(stop_again)
    wait_for(lambda: "channel-scripted" in again.health.liveness()[1]["loops"])
    stop_again.set()
    again.join()
    assert again.health.liveness() == (True, {"loops": {}})
