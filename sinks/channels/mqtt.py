"""The MQTT channel (``MqttOutput``; settings ``alerts.mqtt``, ``--mqtt URL``): each alert
published to a broker, QoS 1, with each stream's state retained.

Topics (``<prefix>`` is ``alerts.mqtt.topic_prefix``, default ``linewatch``; a stream id
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
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from ...bus.messages import AlertMsg, encode
from .base import AlertChannel, DeliveryPolicy, Flag, OutputError, OutputUnknown, register_channel, secret

log = logging.getLogger(__name__)

_TOPIC_UNSAFE = re.compile(r"[/+#\x00-\x1f]")


def topic_level(stream: str) -> str:
    """A stream id as one MQTT topic level."""
    return _TOPIC_UNSAFE.sub("_", stream) or "_"


class MqttSettings(BaseModel):
    """The MQTT alert output (docs/alerts.md); off unless ``url`` is set."""
    model_config = ConfigDict(extra="forbid")
    url: str | None = None  # mqtt://host[:1883] or mqtts://host[:8883] (TLS)
    username: str | None = None
    password: SecretStr | None = None  # or LINEWATCH_ALERTS__MQTT__PASSWORD, or password_file
    password_file: str | None = None
    ca_file: str | None = None  # CA bundle for mqtts:// (default: the system's)
    topic_prefix: str = Field(default="linewatch", pattern=r"^[^#+\x00]+$")
    client_id: str | None = None  # default: linewatch-<host>-<pid>
    discovery: bool = False  # publish Home Assistant MQTT discovery (a binary_sensor per stream)
    discovery_prefix: str = "homeassistant"


class MqttChannelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mqtt: MqttSettings = MqttSettings()


@register_channel
class MqttOutput(AlertChannel):
    name = "mqtt"
    Settings = MqttChannelSettings
    flags = (
        Flag("--mqtt", "mqtt.url", "publish alerts to this MQTT broker, mqtt://host[:1883] or mqtts://host[:8883] "
             "(docs/alerts.md; user and password in the config or environment)", metavar="URL"),
        Flag("--mqtt-topic-prefix", "mqtt.topic_prefix",
             "MQTT topics are PREFIX/<stream>/open|closed|state (default linewatch)", metavar="PREFIX"),
        Flag("--mqtt-discovery", "mqtt.discovery",
             "also publish Home Assistant MQTT discovery (one problem sensor per stream)", const=True),
    )

    @classmethod
    def from_settings(cls, settings: MqttChannelSettings, delivery: DeliveryPolicy) -> list[AlertChannel]:
        m = settings.mqtt
        if not m.url:
            return []
        if m.ca_file is not None and not Path(m.ca_file).is_file():
            raise ValueError(f"alerts.mqtt.ca_file: file not found: {m.ca_file}")
        return [cls(m.url, username=m.username, ca_file=m.ca_file, topic_prefix=m.topic_prefix,
                    password=secret(m.password, m.password_file, "alerts.mqtt.password_file"),
                    client_id=m.client_id, discovery=m.discovery, discovery_prefix=m.discovery_prefix,
                    timeout_s=delivery.timeout_s)]

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
