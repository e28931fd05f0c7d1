"""Alert channels: a JSONL file and a webhook (MQTT and Apprise are in ``channels``).

A channel (``AlertOutput``) makes one delivery attempt per ``send``: ``OutputError`` means
"not delivered, try again later", ``OutputUnknown`` "the receiver may have it" (a timeout
after the request was sent, a connection dropped before the answer), ``OutputRefused``
"retrying cannot help". ``delivery.Channel`` runs each one as its own consumer of the alerts
topic, with the retries, the backoff and the dead letters. A new kind of channel is a
subclass with a stable ``name`` (its consumer group is named after it, so its backlog
survives restarts) and a ``send``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import http.client
import urllib.parse
from abc import ABC, abstractmethod
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..bus.messages import AlertMsg, encode
from ..ops import metrics


SIGNATURE_HEADER = "X-Linewatch-Signature"
HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


class DeliveryPolicy(BaseModel):
    """How hard a channel tries (settings ``alerts.delivery`` and ``alerts.channels.<kind>``)."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(10.0, gt=0)  # one attempt (webhook: for an answer; MQTT: for the broker's PUBACK)
    attempts: int = Field(10, ge=0)  # then a dead letter; 0: no limit (max_age_s still applies)
    max_age_s: float = Field(86400.0, ge=0)  # an alert decided longer ago is dead-lettered, not sent; 0: none
    backoff_s: float = Field(0.5, ge=0)  # before the second attempt, doubling ...
    max_backoff_s: float = Field(60.0, ge=0)  # ... up to this

    def backoff(self, attempt: int) -> float:
        """The wait after attempt number ``attempt`` (1, 2, ...)."""
        return min(self.backoff_s * 2 ** min(attempt - 1, 30), self.max_backoff_s)


class OutputError(RuntimeError):
    """One delivery attempt failed; worth trying again."""


class OutputUnknown(OutputError):
    """The attempt may have reached the receiver (no answer within the timeout, the connection
    dropped after sending): retried with the same idempotency key, never called "not delivered"."""


class OutputRefused(OutputError):
    """The receiver refused the alert: retrying cannot help, it is dead-lettered at once."""


class AlertOutput(ABC):
    name: str = ""  # stable and unique among a sink's channels: its consumer group is named after it
    delivery: DeliveryPolicy = DeliveryPolicy()  # attempts, backoff, maximum age (wiring sets it from settings)

    @abstractmethod
    def send(self, alert: AlertMsg) -> None:
        """One attempt to deliver ``alert`` (durably, as far as the output can say)."""

    def close(self) -> None:
        pass


class JsonlOutput(AlertOutput):
    """One JSON line per alert, appended and flushed (not fsynced). The (event_id, status) pairs
    already in the file are read at start and never written again, so an alert the sink was
    killed before recording as delivered is not repeated."""

    name = "jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written: set[tuple[str, str]] = set()
        torn_tail = False
        if self.path.exists():
            with self.path.open("rb") as existing:
                for line in existing:
                    try:
                        row = json.loads(line)
                        self.written.add((row["event_id"], row["status"]))
                    except (ValueError, KeyError, TypeError):
                        pass  # a line torn by a crash mid-write: that alert gets written again
                    torn_tail = not line.endswith(b"\n")
        self.file = self.path.open("ab")
        if torn_tail:  # never glue a new line onto a torn one
            self.file.write(b"\n")

    def send(self, alert: AlertMsg) -> None:
        key = (alert.event_id, alert.status)
        if key in self.written:
            return
        try:
            self.file.write(encode(alert) + b"\n")
            self.file.flush()
        except OSError as err:  # disk full, ...
            raise OutputError(f"{self.path}: {err}") from None
        self.written.add(key)

    def close(self) -> None:
        self.file.close()


class WebhookOutput(AlertOutput):
    """POSTs each alert as JSON, with an ``Idempotency-Key: <event_id>/<status>`` header that is
    the same on every attempt: a receiver that got an alert twice (an answer lost to a timeout,
    a restart between its answer and the channel's commit) can tell. Refused connections, DNS
    errors, 5xx and 429 are "not delivered" and retried; no answer within ``timeout_s`` once
    the request was sent is "unknown" (retried too); other statuses are refused. ``headers`` go
    with every POST (their values may be secrets: never logged); with ``secret``, an HMAC
    signature (``sign``) lets the receiver check the alert came from this sink, unchanged."""

    name = "webhook"

    def __init__(self, url: str, timeout_s: float = 10.0, headers: dict[str, str] | None = None,
                 secret: str | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL must be http(s)://host[:port]/path, got {url!r}")
        if timeout_s <= 0:
            raise ValueError("webhook timeout_s must be > 0")
        for name, value in (headers or {}).items():
            if not HEADER_NAME.fullmatch(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"webhook header {name!r}: a name of letters, digits and -, and a value on one line")
        self.url, self.parts, self.timeout_s = url, parts, timeout_s
        self.headers = {"Content-Type": "application/json", "User-Agent": "linewatch", **(headers or {})}
        self.secret = secret.encode() if secret else None

    def send(self, alert: AlertMsg) -> None:
        body = encode(alert)
        headers = {**self.headers, "Idempotency-Key": f"{alert.event_id}/{alert.status}",
                   "X-Linewatch-Event": alert.status}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        parts = self.parts
        connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_type(parts.hostname, parts.port, timeout=self.timeout_s)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            try:  # until the whole request is out, the receiver cannot have the alert
                connection.request("POST", target, body=body, headers=headers)
            except (OSError, http.client.HTTPException) as err:
                raise self._failed(OutputError, describe(err)) from None
            try:
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as err:
                raise self._failed(OutputUnknown, f"no answer after sending ({describe(err)})") from None
        finally:
            connection.close()
        if not 200 <= response.status < 300:
            retriable = response.status == 429 or response.status >= 500
            raise self._failed(OutputError if retriable else OutputRefused, f"HTTP {response.status} {response.reason}")

    def _failed(self, error: type[OutputError], why: str) -> OutputError:
        metrics.WEBHOOK_FAILURES.inc()
        return error(f"webhook POST to {self.url} failed ({why})")


def describe(err: BaseException) -> str:
    """An exception in a few words: timeouts and dropped connections have empty messages."""
    if isinstance(err, TimeoutError):
        return "timed out"
    return str(err) or type(err).__name__


def sign(secret: bytes, body: bytes, at: int | None = None) -> str:
    """The ``X-Linewatch-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``.
    A receiver recomputes it and compares in constant time; the time lets it refuse old replays."""
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"
