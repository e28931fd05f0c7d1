"""Issue 22, item 1: a channel's secret reaches no log line (DEBUG included, third-party
libraries too), no dead letter and no metric, whichever way the channel fails. Each channel
is built from settings (the start-up path that registers its secrets with the redactor) and
run by the real alert sink against a real receiver on loopback that refuses the connection,
answers an error, never answers (a timeout), or a host that does not resolve (``.invalid``)."""

from __future__ import annotations

import logging
import socket
import threading
from contextlib import contextmanager

import pytest
from prometheus_client import REGISTRY, generate_latest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import DeadLetter, SessionEnd, decode, encode
from linewatch.bus.redact import redact
from linewatch.ops.logs import TextFormatter
from linewatch.pipeline.settings import load_settings
from linewatch.pipeline.wiring import alert_channels
from linewatch.sinks.alert_sink import AlertSink
from linewatch.sinks.events import AlertPolicy

from helpers import read_all, score_msg, wait_for

# shaped like real ones; each is registered by the settings it comes in, nowhere else
PATH_TOKEN = "Zx81kq0Pa9dLm2Nc4Vb7Qw"
PATH_ID = "B07Kd2Rx9"  # Slack-like: too short for the path pattern (16+), so only the registry masks it
HEADER_TOKEN = "hdr7Hq2Lw9Xv3Bn5Mk8"
SIGNING_KEY = "sign-4Tg8Rd2Yp6Kc"
MQTT_PASSWORD = "mq-Pw5Jh3Nf7Vs1"
APPRISE_TOKEN = "ap9Rt4Ye6Uw2Qx8Zc"
APPRISE_HEADER = "apikey3Fv7Gb1Nm5Hj"
SECRETS = [PATH_TOKEN, PATH_ID, HEADER_TOKEN, SIGNING_KEY, MQTT_PASSWORD, APPRISE_TOKEN, APPRISE_HEADER]
LOGGERS = ("linewatch", "apprise", "urllib3", "paho")

# one event: opens on frames 2-3 (k=2 of n=3), closes on three normal frames: two alerts
BITS = "0011000000"


class Silent:
    """A TCP listener on loopback that accepts and never answers (HTTP or MQTT: a timeout)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.server.settimeout(0.1)
        while not self.stop.is_set():
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop.set()
        for conn in self.held:
            conn.close()
        self.server.close()


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@contextmanager
def receiver(kind: str, webhook, tmp_path):
    """``host:port`` failing the way ``kind`` says."""
    if kind == "refused":
        yield f"127.0.0.1:{closed_port()}"
    elif kind == "error":
        hook = webhook([500])
        yield hook.url.removeprefix("http://").split("/")[0]
    elif kind == "timeout":
        silent = Silent()
        try:
            yield f"127.0.0.1:{silent.port}"
        finally:
            silent.close()
    else:  # dns
        yield "hooks.invalid"


# two attempts per alert, short waits: a dead letter within seconds, through the retry path
DELIVERY = {"attempts": 2, "backoff_s": 0.01, "max_backoff_s": 0.01, "timeout_s": 0.3}


def run_failing_channel(alerts: dict, caplog) -> tuple[list[str], list[bytes], str]:
    """The alert sink with the one channel ``alerts`` configures, until both alerts are
    dead-lettered: (the log lines as linewatch writes them, the dead-letter records, the metrics)."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    bus, stop = MemoryBus(partitions=1), threading.Event()
    settings = load_settings(None, {"alerts": {"publish": False, "delivery": DELIVERY, **alerts}})
    [channel] = alert_channels(settings)
    assert channel.delivery.attempts == 2  # the settings' policy reached the channel
    sink = AlertSink(bus, lambda stream: AlertPolicy(k=2, n=3), [channel], publish=settings.alerts.publish,
                     poll_s=0.05)
    thread = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    thread.start()
    try:
        producer = bus.producer()
        for i, bit in enumerate(BITS):
            producer.send(bus.topics.scores, encode(score_msg(i, 0.9 if bit == "1" else 0.1)), key=b"cam")
        producer.send(bus.topics.scores, encode(SessionEnd(stream="cam", frames=len(BITS), ts=2000.0)), key=b"cam")
        wait_for(lambda: len(read_all(bus, bus.topics.dead)) == 2, 60, "both alerts dead-lettered")
    finally:
        stop.set()
        thread.join(30)
    formatter = TextFormatter(redact)  # what `linewatch` puts on every handler (ops/logs.py)
    lines = [formatter.format(record) for record in caplog.records]
    return lines, [record.value for record in read_all(bus, bus.topics.dead)], generate_latest(REGISTRY).decode()


def assert_no_secret(lines: list[str], dead: list[bytes], scrape: str, failure_words: str) -> None:
    leaked_lines = [line for line in lines if any(secret in line for secret in SECRETS)]
    leaked_dead = [letter for letter in dead if any(secret.encode() in letter for secret in SECRETS)]
    leaked_metrics = [line for line in scrape.splitlines() if any(secret in line for secret in SECRETS)]
    assert (len(leaked_lines), len(leaked_dead), len(leaked_metrics)) == (0, 0, 0), (
        f"{len(leaked_lines)} of {len(lines)} log lines, {len(leaked_dead)} of {len(dead)} dead letters and "
        f"{len(leaked_metrics)} metric lines carry a secret: {leaked_lines[:3]} {leaked_dead[:1]}")
    reasons = [decode(letter, DeadLetter).reason for letter in dead]
    # a timeout after sending is "may have been delivered"; every other failure "not delivered"
    assert len(reasons) == 2 and all(("not delivered" in reason or "may have been delivered" in reason)
                                     and "after 2 attempt(s)" in reason for reason in reasons), reasons
    # what an operator needs stays readable: the failure, the host, the ordinary words
    assert any(word in " ".join(lines + reasons) for word in failure_words.split("|")), (lines, reasons)


FAILURE_WORDS = {"refused": "refused", "error": "500|not accepted", "timeout": "timed out|not accepted",
                 "dns": "Name or service not known|not known|not accepted"}


@pytest.mark.parametrize("kind", ["refused", "error", "timeout", "dns"])
def test_a_failing_webhook_keeps_its_secrets(kind, webhook, tmp_path, caplog):
    with receiver(kind, webhook, tmp_path) as where:
        lines, dead, scrape = run_failing_channel(
            {"webhook": f"http://{where}/hooks/{PATH_ID}/{PATH_TOKEN}", "webhook_secret": SIGNING_KEY,
             "webhook_headers": {"Authorization": f"Bearer {HEADER_TOKEN}"}}, caplog)
    assert_no_secret(lines, dead, scrape, FAILURE_WORDS[kind])
    # the channel's own error text: host kept, token masked, in the log and in each dead letter
    said = f"webhook POST to http://{where}/hooks/***/*** failed ("
    assert any(said in line for line in lines), lines
    assert all(said in decode(letter, DeadLetter).reason for letter in dead), dead


@pytest.mark.parametrize("kind", ["refused", "error", "timeout", "dns"])
def test_a_failing_apprise_service_keeps_its_secrets(kind, webhook, tmp_path, caplog):
    """Apprise's json:// service: its token in the path, an API key as a header (``+Name=``)."""
    with receiver(kind, webhook, tmp_path) as where:
        url = f"json://{where}/hooks/{APPRISE_TOKEN}?+X-Api-Key={APPRISE_HEADER}&cto=0.3&rto=0.3"
        lines, dead, scrape = run_failing_channel({"apprise": [url]}, caplog)
    assert_no_secret(lines, dead, scrape, FAILURE_WORDS[kind])


@pytest.mark.services
@pytest.mark.parametrize("kind", ["refused", "error", "timeout", "dns"])
def test_a_failing_mqtt_broker_keeps_the_password(kind, webhook, tmp_path, caplog):
    """MQTT's "error" is a broker that refuses the login (it knows no user)."""
    from services import mosquitto_broker

    def mqtt_receiver():
        if kind == "error":
            return mosquitto_broker(tmp_path / "mqtt", anonymous=False)
        return receiver(kind, webhook, tmp_path)

    with mqtt_receiver() as where:
        url = where if where.startswith("mqtt://") else f"mqtt://{where}"
        lines, dead, scrape = run_failing_channel(
            {"mqtt": {"url": url, "username": "linewatch", "password": MQTT_PASSWORD}}, caplog)
    assert_no_secret(lines, dead, scrape, "not connected|refused")


# ---- the registry: every setting that holds a secret registers it at start-up ------------------------
def test_every_secret_setting_is_masked_in_any_spelling(tmp_path, monkeypatch):
    password_file = tmp_path / "sasl"
    password_file.write_text("kafka-Sasl-9f2e\n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws/Secret+Key9")
    load_settings(None, {
        "redis_url": "redis://:redis-Pw-31@127.0.0.1:6379/0", "redis": {"password": "redis-Second-77"},
        "kafka": {"sasl_password_file": str(password_file)},
        "console": {"token": "console-token-0123456789abcdef"},
        "alerts": {"mqtt": {"password": "mqtt-Pw-44"}, "webhook": "https://hooks.example/services/T01/B02/xyzABC123",
                   "apprise": ["slack://TokenA1b2/TokenB3c4/TokenC5d6e7f8"]}})
    from linewatch.pipeline.wiring import kafka_options

    kafka_options(load_settings(None, {"kafka": {"sasl_password_file": str(password_file)}}))  # read: registered
    for secret in ["redis-Pw-31", "redis-Second-77", "kafka-Sasl-9f2e", "console-token-0123456789abcdef",
                   "mqtt-Pw-44", "xyzABC123", "TokenA1b2", "TokenB3c4", "TokenC5d6e7f8", "aws/Secret+Key9"]:
        for spelling in (secret, secret.replace("/", "%2F").replace("+", "%2B")):
            text = f"AUTH {spelling} failed; retrying in 2 s (at least 3 tries)"
            assert redact(text) == "AUTH *** failed; retrying in 2 s (at least 3 tries)", secret


def test_ordinary_words_are_never_masked():
    from linewatch.bus.redact import register_secret

    for short in ("at", "s", "the"):  # too short to be a secret: ignored, or every "at" would go
        register_secret(short)
    for text in ["console token: at least 16 characters of letters, digits and ._~+/=-",
                 "token bucket at rate 5/s", "password: at least 8 characters", "the key is at the top",
                 "webhook http://127.0.0.1:8080/hooks: HTTP 500 Internal Server Error",
                 "stream drone-7 session 20261201T164824Z-a70cb7 frame 12 at 0.93"]:
        assert redact(text) == text
