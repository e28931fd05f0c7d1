"""Alert outputs (JSONL, the alerts topic, a webhook) and their off-thread delivery: one
attempt per send, retries with backoff, refusal, dead-lettering, backpressure, cancelling."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import AlertMsg, decode
from linewatch.sinks.alerts import AlertPolicy, AlertTracker
from linewatch.sinks.outputs import (
    AlertOutput,
    BusOutput,
    Delivery,
    JsonlOutput,
    OutputError,
    OutputRefused,
    Parcel,
    WebhookOutput,
)

from helpers import score_msg, wait_for


def alerts(bits: str = "0110000", stream: str = "cam") -> list[AlertMsg]:
    tracker = AlertTracker(lambda s: AlertPolicy())
    return [a for seq, bit in enumerate(bits) for a in tracker.push(score_msg(seq, 0.9 if bit == "1" else 0.1,
                                                                            stream=stream))]


class Recorder:
    """Delivery's callbacks, recorded in order."""

    def __init__(self):
        self.done, self.failed = [], []

    def start(self, delivery: Delivery) -> Delivery:
        delivery.start(lambda parcel: self.done.append(parcel), lambda parcel, why: self.failed.append((parcel, why)))
        return delivery


class Scripted(AlertOutput):
    """An output whose attempts fail as scripted (an exception class, or None for success); it
    can be held inside an attempt until ``release`` is set."""

    name = "scripted"

    def __init__(self, script=(), retries=5, release: threading.Event | None = None):
        self.script, self.retries, self.backoff_s, self.release = list(script), retries, 0.01, release
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


def test_bus_output_publishes_keyed_by_stream():
    bus = MemoryBus()
    reader = bus.consumer([bus.topics.alerts], "reader")
    output = BusOutput(bus.producer(), bus.topics.alerts)
    for alert in alerts():
        output.send(alert)
    records = reader.poll(1.0)
    assert [(r.key, decode(r.value, AlertMsg).status) for r in records] == [(b"cam", "open"), (b"cam", "closed")]


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
    assert not isinstance(unreachable.value, OutputRefused)
    with pytest.raises(ValueError, match="http"):
        WebhookOutput("ftp://example.org/x")


# ---- delivery: queue, thread, retries ------------------------------------------------------------------
def test_delivery_retries_until_delivered():
    output, record = Scripted([OutputError, OutputError]), Recorder()
    delivery = record.start(Delivery(output))
    alert = alerts()[0]
    assert delivery.put(Parcel(alert, 0), threading.Event())
    wait_for(lambda: record.done)
    delivery.close()
    assert output.attempts == ["cam:1/open"] * 3 and [p.alert for p in record.done] == [alert]
    assert record.failed == [] and (delivery.delivered, delivery.failed) == (1, 0)


def test_delivery_gives_up_after_its_retries_and_goes_on(caplog):
    caplog.set_level(logging.INFO, "linewatch")
    output, record = Scripted([OutputError] * 3 + [RuntimeError], retries=2), Recorder()
    delivery = record.start(Delivery(output))
    first, second = alerts()
    for alert in (first, second):
        delivery.put(Parcel(alert, 0), threading.Event())
    wait_for(lambda: record.done)
    delivery.close()
    ((parcel, why),) = record.failed
    assert parcel.alert == first and "not delivered after 3 attempt(s); last error: scripted failure" in why
    # the second alert: a bug in the output (RuntimeError) is retried like any failure, then it works
    assert [p.alert for p in record.done] == [second] and output.attempts.count("cam:1/closed") == 2
    assert caplog.text.count("is failing") == 1 and caplog.text.count("works again") == 1  # once per outage


def test_a_refused_alert_is_not_retried():
    output, record = Scripted([OutputRefused]), Recorder()
    delivery = record.start(Delivery(output))
    delivery.put(Parcel(alerts()[0], 0), threading.Event())
    wait_for(lambda: record.failed)
    delivery.close()
    assert output.attempts == ["cam:1/open"] and "refused" in record.failed[0][1]


def test_a_full_queue_holds_the_caller_back_and_drops_nothing():
    release = threading.Event()
    output, record = Scripted(release=release), Recorder()
    delivery = record.start(Delivery(output, capacity=1))
    stop = threading.Event()
    many = alerts("0110000011000001100")
    delivery.put(Parcel(many[0], 0), stop)  # taken by the thread, held inside its attempt
    wait_for(output.entered.is_set)
    delivery.put(Parcel(many[1], 0), stop)  # fills the queue
    putter = threading.Thread(target=lambda: [delivery.put(Parcel(a, 0), stop) for a in many[2:]])
    putter.start()
    putter.join(0.3)
    assert putter.is_alive() and len(delivery.queue) == 1  # waiting for room: backpressure
    release.set()
    putter.join(10)
    wait_for(delivery.idle)
    delivery.close()
    assert [p.alert for p in record.done] == many  # every one, in order


def test_a_stop_ends_a_wait_for_room_without_queueing():
    release = threading.Event()
    output = Scripted(release=release)
    delivery = Recorder().start(Delivery(output, capacity=1))
    first, second = alerts()
    stop = threading.Event()
    delivery.put(Parcel(first, 0), stop)
    wait_for(output.entered.is_set)
    delivery.put(Parcel(second, 0), stop)
    stop.set()
    assert delivery.put(Parcel(first, 1), stop) is False
    release.set()
    delivery.close()


def test_closing_stops_retrying_and_leaves_the_alert_pending():
    output, record = Scripted([OutputError] * 100), Recorder()
    output.backoff_s = 60.0  # a close must not wait for this
    delivery = record.start(Delivery(output))
    delivery.put(Parcel(alerts()[0], 0), threading.Event())
    wait_for(lambda: output.attempts)
    delivery.close()  # a liveness check: returns at once, not after a minute of backoff
    assert record.done == [] and record.failed == []  # neither: the sink's state still holds it pending


def test_cancel_drops_a_lost_partitions_parcels_and_ends_its_attempt():
    class DownForA(Scripted):  # stream a's receiver is down, b's is up
        def send(self, alert):
            self.attempts.append(alert.event_id)
            self.entered.set()
            if alert.stream == "a":
                raise OutputError("down")

    output, record = DownForA(), Recorder()
    output.backoff_s = 60.0  # cancel must not wait for this
    delivery = record.start(Delivery(output))
    stop = threading.Event()
    a, b = alerts(stream="a"), alerts(stream="b")
    delivery.put(Parcel(a[0], 0), stop)  # partition 0: failing, then backing off
    delivery.put(Parcel(b[0], 1), stop)
    delivery.put(Parcel(a[1], 0), stop)
    wait_for(output.entered.is_set)
    delivery.cancel({0})  # partition 0 went to another sink: its new owner delivers those
    wait_for(delivery.idle)
    delivery.close()
    assert [p.alert for p in record.done] == [b[0]] and record.failed == []  # a's: neither, left to the new owner
    assert "a:1" not in output.attempts[output.attempts.index("b:1"):]
