"""Alert channels that cannot hold each other back, on a real Kafka-protocol broker (Tansu):
each channel is its own consumer group of the alerts topic. A webhook that is down for a
whole run holds back neither the sink, nor the JSONL file, nor the alerts topic, and gets its
backlog after a restart; a webhook that answers too late is never called "not delivered"."""

from __future__ import annotations

import secrets
import threading

import pytest

from linewatch.bench.broker import free_port
from linewatch.bus.messages import AlertMsg, DeadLetter, decode
from linewatch.pipeline.wiring import connect
from linewatch.sinks.alert_sink import AlertSink
from linewatch.sinks.events import AlertPolicy
from linewatch.sinks.delivery import channel_group
from linewatch.sinks.channels import DeliveryPolicy
from linewatch.sinks.channels.jsonl import JsonlOutput
from linewatch.sinks.channels.webhook import WebhookOutput

from helpers import (
    Processes,
    by_stream,
    expected_alerts,
    jsonl_rows,
    publish_scores,
    read_topic,
    scores_of,
    wait_for,
)

pytestmark = pytest.mark.services

PARTITIONS = 2
def committed(servers: str, group: str, topic: str) -> int:
    """Records of ``topic`` the consumer ``group`` has committed."""
    from kafka import KafkaConsumer, TopicPartition

    probe = KafkaConsumer(bootstrap_servers=servers, group_id=group, enable_auto_commit=False)
    try:
        return sum(probe.committed(TopicPartition(topic, p)) or 0 for p in range(PARTITIONS))
    finally:
        probe.close()


def test_a_webhook_down_for_a_whole_run_holds_nothing_back_and_gets_its_backlog_after_a_restart(
        kafka_servers, tmp_path, webhook):
    """Eight streams, 1,008 alerts; the webhook refuses connections for the whole first run.
    JSONL and the alerts topic get every alert, each stream's in order, while the webhook's
    channel has delivered (committed) nothing. The sink is stopped, the webhook brought up on
    its port, the sink restarted: the webhook gets the whole backlog, each alert once (by
    idempotency key), each stream's in order; the JSONL file gets nothing twice."""
    prefix = f"ch-{secrets.token_hex(3)}"
    bus = connect(f"kafka://{kafka_servers}", prefix, PARTITIONS)
    streams = [f"drone-{i}" for i in range(8)]
    scores = scores_of(streams, events=63)
    expected = expected_alerts(scores)
    total = sum(map(len, expected.values()))
    assert total >= 1000
    port, path = free_port(), tmp_path / "alerts.jsonl"  # nothing listens on the port yet
    processes = Processes(tmp_path)
    args = ["sink", "alerts", "--bootstrap-servers", kafka_servers, "--topic-prefix", prefix,
            "--partitions", str(PARTITIONS), "--jsonl", str(path), "--webhook", f"http://127.0.0.1:{port}/hook",
            "--channel-attempts", "0", "--channel-max-backoff", "0.2"]  # retried without limit, briefly apart
    try:
        processes.start("sink", *args)
        publish_scores(bus, scores)

        def on_topic() -> list[tuple[str, str]]:
            return [(a.event_id, a.status) for a in (decode(r.value, AlertMsg)
                                                    for r in read_topic(bus, bus.topics.alerts))]

        wait_for(lambda: len(jsonl_rows(path)) >= total and processes.alive("sink") is None, 600,
                 "every alert in the JSONL file", state=lambda: len(jsonl_rows(path)))
        assert by_stream(jsonl_rows(path)) == expected  # every alert, each stream's in order
        assert by_stream(on_topic()) == expected
        webhook_group = channel_group(bus.topics.alerts, "webhook")
        assert committed(kafka_servers, webhook_group, bus.topics.alerts) == 0  # the webhook took nothing
        wait_for(lambda: "alert channel webhook is failing" in processes.log("sink"), 60, "the webhook's warning")
        processes.stop("sink")

        up = webhook([200], port=port)
        processes.start("sink", *args)
        wait_for(lambda: len(up.keys) >= total, 600, "the webhook's backlog", state=lambda: len(up.keys))
        wait_for(lambda: committed(kafka_servers, webhook_group, bus.topics.alerts) == total, 60,
                 "the webhook channel to commit its backlog")
        processes.stop("sink")
    finally:
        processes.stop_all()
    keys = up.keys
    assert len(keys) == len(set(keys)) == total  # once each
    posted = [tuple(key.split("/")) for key in keys]
    assert by_stream(posted) == expected  # each stream's in order
    assert by_stream(jsonl_rows(path)) == expected  # nothing written twice by the restarted sink


def test_a_webhook_that_answers_after_the_timeout_is_never_called_not_delivered(kafka_servers, tmp_path, webhook):
    """The receiver records every POST and answers 2 s later; the client waits 0.3 s. Each alert
    is tried three times with the same idempotency key, then dead-lettered as "may have been
    delivered" with the attempt count: no alert the receiver has is called "not delivered"."""
    bus = connect(f"kafka://{kafka_servers}", f"sl-{secrets.token_hex(3)}", PARTITIONS)
    slow = webhook([200], delay_s=2.0)
    scores = scores_of(["drone-a", "drone-b"], events=2)
    expected = expected_alerts(scores)
    total = sum(map(len, expected.values()))
    hook = WebhookOutput(slow.url, timeout_s=0.3)
    hook.delivery = DeliveryPolicy(timeout_s=0.3, attempts=3, backoff_s=0.05, max_backoff_s=0.1)
    sink = AlertSink(bus, lambda stream: AlertPolicy(), [JsonlOutput(tmp_path / "alerts.jsonl"), hook], poll_s=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        publish_scores(bus, scores)

        def letters() -> list[DeadLetter]:
            return [decode(r.value, DeadLetter) for r in read_topic(bus, bus.topics.dead)]

        wait_for(lambda: len(letters()) >= total, 300, "a dead letter per alert", state=lambda: len(letters()))
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    received = set(slow.keys)
    assert received == {f"{e}/{s}" for rows in expected.values() for e, s in rows}
    assert all(slow.keys.count(key) == 3 for key in received)  # retried with the same key
    for letter in letters():
        alert = decode(letter.payload, AlertMsg)
        assert f"{alert.event_id}/{alert.status}" in received
        assert "may have been delivered" in letter.reason and "3 attempt(s)" in letter.reason, letter.reason
        assert "not delivered" not in letter.reason
