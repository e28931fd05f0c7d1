"""Alert channels beside the JSONL file, the alerts topic and the webhook: MQTT (``MqttOutput``)
and email / Slack / Teams / ... through Apprise (``AppriseOutput``). Each is an ``AlertOutput``:
one delivery attempt per ``send``, run by ``delivery.Channel`` as its own consumer of the
alerts topic with retries and backoff, so a broker or a chat service that is down delays no
other channel.

MQTT topics (``<prefix>`` is ``alerts.mqtt.topic_prefix``, default ``linewatch``; a stream id
becomes one topic level, with ``/``, ``+``, ``#`` and control characters made ``_``):

- ``<prefix>/<stream>/open`` and ``<prefix>/<stream>/closed``: each alert as JSON (the
  AlertMsg), QoS 1, not retained;
- ``<prefix>/<stream>/state``: retained, the stream's current state as JSON
  (``{"state": "ON"|"OFF", "event_id", "status", "peak_score", "start_ts", "end_ts", "latitude", "longitude"}``),
  so a subscriber that connects later sees whether an event is open;
- ``<prefix>/availability``: retained ``online`` while the sink is connected, ``offline``
  (the broker's last will) when it is gone;
- with ``discovery``: ``<discovery_prefix>/binary_sensor/linewatch_<stream>/config``, retained,
  Home Assistant's MQTT discovery of one ``problem`` binary sensor per stream, sent before the
  stream's first alert.

The client connects in the background and reconnects by itself (1 s .. 30 s); ``send``
refuses at once while it is disconnected (not delivered: retried with backoff), and waits at
most ``timeout_s`` for the broker's PUBACK (none: the broker may have it, retried the same).
At-least-once: an alert whose PUBACK was lost is sent again, with the same ``event_id`` and
``status``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import urllib.parse

from ..bus.messages import AlertMsg, encode
from ..bus.redact import register_url_secrets
from .outputs import AlertOutput, OutputError, OutputUnknown

log = logging.getLogger(__name__)

_TOPIC_UNSAFE = re.compile(r"[/+#\x00-\x1f]")


def topic_level(stream: str) -> str:
    """A stream id as one MQTT topic level."""
    return _TOPIC_UNSAFE.sub("_", stream) or "_"


class MqttOutput(AlertOutput):
    name = "mqtt"

    def __init__(self, url: str, *, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, topic_prefix: str = "linewatch", client_id: str | None = None,
                 discovery: bool = False, discovery_prefix: str = "homeassistant", timeout_s: float = 5.0):
        import paho.mqtt.client as mqtt

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.username or parts.password:
            raise ValueError("alerts.mqtt.url must be mqtt://host[:port] or mqtts://host[:port] "
                             "(user and password go in alerts.mqtt.username and the password setting)")
        self.host, self.port = parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self.prefix, self.discovery, self.discovery_prefix = topic_prefix.rstrip("/"), discovery, discovery_prefix
        self.timeout_s = timeout_s
        self.announced: set[str] = set()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"linewatch-{socket.gethostname()}-{os.getpid()}")
        if username:
            self.client.username_pw_set(username, password)
        if parts.scheme == "mqtts":
            self.client.tls_set(ca_certs=ca_file)
        self.availability = f"{self.prefix}/availability"
        self.client.will_set(self.availability, "offline", qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.reconnect_delay_set(1, 30)
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()  # paho's network thread: connects, reconnects, sends

    @property
    def where(self) -> str:
        return f"MQTT broker {self.host}:{self.port}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("%s refused the connection: %s", self.where, reason_code)
            return
        client.publish(self.availability, "online", qos=1, retain=True)
        self.announced.clear()  # the broker may have lost its retained messages: announce again
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()

    def send(self, alert: AlertMsg) -> None:
        if not self.connected.is_set():
            raise OutputError(f"{self.where} is not connected")
        level = topic_level(alert.stream)
        if self.discovery and alert.stream not in self.announced:
            self._publish(*self._discovery(alert.stream, level), retain=True)
            self.announced.add(alert.stream)
        self._publish(f"{self.prefix}/{level}/{alert.status}", encode(alert), retain=False)
        self._publish(f"{self.prefix}/{level}/state", json.dumps(state_of(alert)).encode(), retain=True)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(self.timeout_s)
        except (RuntimeError, ValueError) as err:
            raise OutputError(f"{self.where}: {topic}: {err}") from None
        if not info.is_published():  # sent, unacknowledged: the broker may have it
            raise OutputUnknown(f"{self.where}: no acknowledgement for {topic} within {self.timeout_s:g} s")

    def _discovery(self, stream: str, level: str) -> tuple[str, bytes]:
        """Home Assistant MQTT discovery: one binary sensor (device class ``problem``) per stream."""
        object_id = f"linewatch_{re.sub(r'[^A-Za-z0-9_-]', '_', stream)}"
        if object_id != f"linewatch_{stream}":  # distinct streams must not share an id
            object_id += "_" + hashlib.sha256(stream.encode()).hexdigest()[:8]
        config = {
            "name": f"linewatch {stream}", "unique_id": object_id, "object_id": object_id,
            "device_class": "problem", "state_topic": f"{self.prefix}/{level}/state",
            "value_template": "{{ value_json.state }}", "json_attributes_topic": f"{self.prefix}/{level}/state",
            "availability_topic": self.availability, "payload_available": "online",
            "payload_not_available": "offline",
            "device": {"identifiers": [f"linewatch_{self.prefix}"], "name": "linewatch", "manufacturer": "linewatch"},
        }
        return f"{self.discovery_prefix}/binary_sensor/{object_id}/config", json.dumps(config).encode()

    def close(self) -> None:
        if self.connected.is_set():
            try:
                self.client.publish(self.availability, "offline", qos=1, retain=True).wait_for_publish(1.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


def state_of(alert: AlertMsg) -> dict:
    """The retained state of a stream after ``alert``: ON while its event is open."""
    position = alert.telemetry
    return {"state": "ON" if alert.status == "open" else "OFF", "event_id": alert.event_id, "status": alert.status,
            "stream": alert.stream, "peak_score": alert.peak_score, "threshold": alert.threshold,
            "start_ts": alert.start_ts, "end_ts": alert.end_ts,
            "latitude": position.latitude if position else None, "longitude": position.longitude if position else None}


class AppriseOutput(AlertOutput):
    """One Apprise URL (``mailto://``, ``slack://``, ``msteams://``, ``json://`` ...) or one
    Apprise config file: a short title and a plain-text body per alert, open and closed. The
    name carries a hash of the URL, not the URL (it holds the service's token): stable across
    restarts, so alerts left undelivered are delivered to the same service by the next run."""

    def __init__(self, url: str | None = None, config_file: str | None = None):
        import apprise

        if (url is None) == (config_file is None):
            raise ValueError("an Apprise output takes one URL or one config file")
        self.apprise = apprise.Apprise()
        if url is not None:
            if not self.apprise.add(url):
                raise ValueError("alerts.apprise: a URL Apprise does not understand (see its wiki for the "
                                 "services' URL forms; the URL is not shown, it may hold a token)")
            self.what = next(iter(self.apprise)).url(privacy=True)
        else:
            config = apprise.AppriseConfig()
            if not config.add(config_file) or not self.apprise.add(config) or not len(self.apprise):
                raise ValueError(f"alerts.apprise_config {config_file}: not an Apprise config file with URLs")
            self.what = f"Apprise config {config_file}"
        for service in self.apprise:  # each service's tokens, as Apprise itself spells the URL
            register_url_secrets(service.url(privacy=False))
        self.name = "apprise-" + hashlib.sha256((url or f"config:{config_file}").encode()).hexdigest()[:10]

    def send(self, alert: AlertMsg) -> None:
        title, body = message_text(alert)
        if not self.apprise.notify(title=title, body=body):
            raise OutputError(f"{self.what}: the notification was not accepted")


def message_text(alert: AlertMsg) -> tuple[str, str]:
    """(title, body) of a chat or email notification."""
    from datetime import datetime, timezone

    def when(ts: float) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")

    verb = "anomaly on" if alert.status == "open" else "cleared:"
    title = f"linewatch: {verb} {alert.stream}"
    lines = [f"event {alert.event_id} ({alert.status})",
             (f"{alert.class_name}, {alert.method}: peak score {alert.peak_score:.3f} "
              f"(threshold {alert.threshold:.3f}) at frame {alert.peak_seq}"),
             f"from {when(alert.start_ts)}" + (f" to {when(alert.end_ts)}" if alert.status == "closed" else ""),
             f"{len(alert.frames)} anomalous frame(s), {alert.start_seq}..{alert.end_seq}"]
    t = alert.telemetry
    if t is not None and t.latitude is not None and t.longitude is not None:
        lines.append(f"position {t.latitude:.6f}, {t.longitude:.6f}"
                     + (f", altitude {t.altitude:.1f} m" if t.altitude is not None else ""))
    return title, "\n".join(lines)
