"""Alert channels beside JSONL / topic / webhook: MQTT against a real mosquitto on loopback
(open and closed events on the documented topics, the retained state, Home Assistant
discovery; a broker that is down delays no other output), Apprise against a real HTTP receiver
(its json:// service), and the webhook's configured headers and HMAC signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import AlertMsg, SessionEnd, Telemetry, encode
from linewatch.pipeline.settings import load_settings
from linewatch.pipeline.wiring import alert_channels
from linewatch.sinks.alert_sink import AlertSink
from linewatch.sinks.events import AlertPolicy
from linewatch.sinks.channels import DeliveryPolicy, OutputError
from linewatch.sinks.channels.apprise import AppriseOutput, message_text
from linewatch.sinks.channels.jsonl import JsonlOutput
from linewatch.sinks.channels.mqtt import MqttOutput, topic_level
from linewatch.sinks.channels.webhook import WebhookOutput, sign

from helpers import score_msg, wait_for

# one event: opens on frames 2-3 (k=2 of n=3), closes once three normal frames follow
BITS = "0011000000"
STREAM = "drone.7"  # stream ids hold no '/' (the schema refuses them); '.' must not reach a discovery id


def send_scores(bus, stream: str = STREAM) -> None:
    producer = bus.producer()
    position = Telemetry(latitude=47.1, longitude=8.5, altitude=520.0)
    for i, bit in enumerate(BITS):
        message = score_msg(i, 0.9 if bit == "1" else 0.1, stream=stream, telemetry=position)
        producer.send(bus.topics.scores, encode(message), key=stream.encode())
    producer.send(bus.topics.scores, encode(SessionEnd(stream=stream, frames=len(BITS), ts=2000.0)),
                  key=stream.encode())


class Subscriber:
    """A real MQTT client that records every message under ``topic`` (retained ones included)."""

    def __init__(self, url: str, topic: str = "#"):
        import paho.mqtt.client as mqtt

        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock, self.ready = threading.Lock(), threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{time.monotonic_ns()}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: self.ready.set()
        self.client.on_message = self._message
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert self.ready.wait(15), "the test's MQTT subscriber did not subscribe"

    def _message(self, client, userdata, message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_sink(bus, outputs, stop: threading.Event) -> threading.Thread:
    sink = AlertSink(bus, lambda stream: AlertPolicy(k=2, n=3), outputs, poll_s=0.05)
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    return thread


@pytest.mark.services
def test_mqtt_events_state_and_discovery_arrive_on_the_documented_topics(tmp_path):
    from services import mosquitto_broker

    with mosquitto_broker(tmp_path / "mqtt") as url:
        watcher = Subscriber(url)
        mqtt = MqttOutput(url, topic_prefix="lw", discovery=True)
        bus, stop = MemoryBus(partitions=1), threading.Event()
        thread = run_sink(bus, [mqtt], stop)
        try:
            send_scores(bus)
            level = topic_level(STREAM)
            assert level == "drone.7" and topic_level("drone/7+#") == "drone_7__"  # '/' can no longer arrive
            wait_for(lambda: len(watcher.on(f"lw/{level}/closed")) == 1, 30, "the closed alert over MQTT")
            opened = [json.loads(p) for p in watcher.on(f"lw/{level}/open")]
            closed = [json.loads(p) for p in watcher.on(f"lw/{level}/closed")]
            assert [a["status"] for a in opened] == ["open"] and [a["status"] for a in closed] == ["closed"]
            assert opened[0]["event_id"] == closed[0]["event_id"] == f"{STREAM}:2" and closed[0]["stream"] == STREAM
            states = [json.loads(p) for p in watcher.on(f"lw/{level}/state")]
            assert [s["state"] for s in states] == ["ON", "OFF"] and states[0]["latitude"] == 47.1
            config = json.loads(watcher.on(f"homeassistant/binary_sensor/linewatch_drone_7_"
                                           f"{hashlib.sha256(STREAM.encode()).hexdigest()[:8]}/config")[0])
            assert config["state_topic"] == f"lw/{level}/state" and config["device_class"] == "problem"
            assert watcher.on("lw/availability")[-1] == b"online"
        finally:
            stop.set()
            thread.join(30)
            watcher.close()
        # a client connecting now gets the stream's last state (retained) and the sink's absence (last will)
        late = Subscriber(url, "lw/#")
        try:
            wait_for(lambda: late.on(f"lw/{level}/state") and late.on("lw/availability"), 15, "the retained messages")
            assert json.loads(late.on(f"lw/{level}/state")[-1])["state"] == "OFF"
            assert late.on("lw/availability")[-1] == b"offline"
        finally:
            late.close()


@pytest.mark.services
def test_a_broker_that_is_down_delays_no_other_output_and_gets_the_alerts_once_up(tmp_path):
    """MQTT points at a port where no broker runs yet: the JSONL file has both alerts while MQTT
    still retries; a broker started there then receives them (paho reconnects on its own)."""
    from linewatch.bench.broker import free_port

    from services import mosquitto_broker

    port = free_port()
    mqtt = MqttOutput(f"mqtt://127.0.0.1:{port}")  # returns at once: it connects in the background
    mqtt.delivery = DeliveryPolicy(attempts=1000, backoff_s=0.2, max_backoff_s=0.5)
    jsonl = tmp_path / "alerts.jsonl"
    bus, stop = MemoryBus(partitions=1), threading.Event()
    thread = run_sink(bus, [JsonlOutput(jsonl), mqtt], stop)
    try:
        send_scores(bus)
        wait_for(lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) == 2, 30, "both alerts in the file")
        assert not mqtt.connected.is_set()  # the file did not wait for it
        with mosquitto_broker(tmp_path / "mqtt", port=port) as url:
            watcher = Subscriber(url)
            try:
                wait_for(lambda: watcher.on(f"linewatch/{topic_level(STREAM)}/closed"), 60, "MQTT to deliver, once up")
                assert len(watcher.on(f"linewatch/{topic_level(STREAM)}/open")) == 1
            finally:
                watcher.close()
    finally:
        stop.set()
        thread.join(30)


def test_mqtt_refuses_a_url_with_credentials_or_another_scheme():
    for url in ("mqtt://user:secret@broker:1883", "http://broker", "mqtt://"):
        with pytest.raises(ValueError) as err:
            MqttOutput(url)
        assert "secret" not in str(err.value)


def test_mqtt_send_while_disconnected_is_worth_retrying():
    from linewatch.bench.broker import free_port

    mqtt = MqttOutput(f"mqtt://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(OutputError, match="not connected"):
            mqtt.send(AlertMsg.model_validate_json(alert_json()))
    finally:
        mqtt.close()


def alert_json(status: str = "open") -> str:
    return AlertMsg(event_id="cam@s1:4", status=status, stream="cam", start_seq=4, end_seq=9, start_ts=1000.0,
                    end_ts=1002.0, peak_score=0.91, peak_seq=6, threshold=0.5, frames=[4, 5, 6, 9], method="aprilgan",
                    class_name="insulator", telemetry=Telemetry(latitude=47.1, longitude=8.5)).model_dump_json()


def test_webhook_sends_configured_headers_and_a_signature_the_receiver_can_check(webhook):
    hook = webhook([200])
    output = WebhookOutput(hook.url, headers={"Authorization": "Bearer hook-token", "X-Site": "north"},
                           secret="shared-secret")
    alert = AlertMsg.model_validate_json(alert_json())
    output.send(alert)
    headers, body = hook.requests[0]
    assert headers["Authorization"] == "Bearer hook-token" and headers["X-Site"] == "north"
    assert headers["X-Linewatch-Event"] == "open" and body == encode(alert)
    # what a receiver does: recompute over "<t>." + body with the shared key, compare in constant time
    fields = dict(part.split("=", 1) for part in headers["X-Linewatch-Signature"].split(","))
    expected = hmac.new(b"shared-secret", f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert abs(int(fields["t"]) - time.time()) < 3600
    assert sign(b"other", body, int(fields["t"])) != headers["X-Linewatch-Signature"]  # the key matters


def test_webhook_headers_are_checked_and_settings_reach_the_output(webhook, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="header"):
        WebhookOutput("http://127.0.0.1:1/hook", headers={"X-Bad\r\nInjected": "1"})
    hook = webhook([200])
    key = tmp_path / "webhook.key"
    key.write_text("from-a-file\n")
    monkeypatch.setenv("LINEWATCH_ALERTS__WEBHOOK_HEADERS", '{"Authorization": "Bearer env-token"}')
    settings = load_settings(None, {"alerts": {"webhook": hook.url, "webhook_secret_file": str(key), "publish": False}})
    assert "env-token" not in repr(settings)  # a secret type: never printed
    [output] = alert_channels(settings)
    output.send(AlertMsg.model_validate_json(alert_json("closed")))
    headers, body = hook.requests[0]
    assert headers["Authorization"] == "Bearer env-token"
    t = headers["X-Linewatch-Signature"].split(",")[0].removeprefix("t=")
    assert headers["X-Linewatch-Signature"] == sign(b"from-a-file", body, int(t))


def test_apprise_notifies_a_real_receiver_and_a_failure_is_retried(webhook):
    hook = webhook([200, 500])
    url = hook.url.replace("http://", "json://")
    output = AppriseOutput(url)
    assert output.name.startswith("apprise-") and "127.0.0.1" not in output.name
    alert = AlertMsg.model_validate_json(alert_json())
    output.send(alert)
    sent = json.loads(hook.bodies[0])
    title, body = message_text(alert)
    assert sent["title"] == title == "linewatch: anomaly on cam" and sent["message"] == body
    assert "peak score 0.910" in body and "position 47.100000, 8.500000" in body
    with pytest.raises(OutputError):  # the receiver answers 500 now
        output.send(alert)


def test_apprise_outputs_from_settings_have_stable_names_and_refuse_nonsense(tmp_path):
    settings = load_settings(None, {"alerts": {"publish": False, "apprise": ["json://127.0.0.1:1/a",
                                                                              "json://127.0.0.1:1/b"]}})
    names = [o.name for o in alert_channels(settings)]
    assert len(set(names)) == 2 and names == [o.name for o in alert_channels(settings)]
    with pytest.raises(ValueError, match="Apprise does not understand") as err:
        AppriseOutput("nonsense://token-123@x")
    assert "token-123" not in str(err.value)
    config = tmp_path / "apprise.yml"
    config.write_text("urls:\n  - json://127.0.0.1:1/c\n")
    [output] = alert_channels(load_settings(None, {"alerts": {"publish": False,
                                                                          "apprise_config": str(config)}}))
    assert output.what == f"Apprise config {config}"


def test_delivery_settings_reach_each_kind_of_channel_and_nonsense_is_refused(webhook, tmp_path):
    hook = webhook([200])
    settings = load_settings(None, {"alerts": {
        "webhook": hook.url, "jsonl": str(tmp_path / "a.jsonl"),
        "delivery": {"attempts": 4, "max_age_s": 600},
        "channels": {"webhook": {"timeout_s": 2.5, "attempts": 0}}}})
    jsonl, hook_output = alert_channels(settings)
    assert (jsonl.delivery.attempts, jsonl.delivery.max_age_s, jsonl.delivery.timeout_s) == (4, 600, 10)
    assert (hook_output.delivery.attempts, hook_output.delivery.max_age_s) == (0, 600)
    assert hook_output.timeout_s == hook_output.delivery.timeout_s == 2.5
    for wrong in ({"channels": {"sms": {"attempts": 1}}}, {"channels": {"webhook": {"atempts": 1}}},
                  {"delivery": {"timeout_s": 0}}):
        with pytest.raises(ValueError):
            load_settings(None, {"alerts": wrong})
