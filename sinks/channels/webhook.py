"""The webhook channel: each alert POSTed as JSON, with an idempotency key and, given a key, an
HMAC signature (``alerts.webhook``, ``alerts.webhook_headers``, ``alerts.webhook_secret``; ``--webhook``)."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import re
import time
import urllib.parse

from pydantic import BaseModel, ConfigDict, SecretStr

from ...bus.messages import AlertMsg, encode
from ...ops import metrics
from .base import AlertChannel, DeliveryPolicy, Flag, OutputError, OutputRefused, OutputUnknown, register_channel, secret

SIGNATURE_HEADER = "X-Linewatch-Signature"
HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    webhook: str | None = None  # the URL; None: no webhook
    webhook_headers: dict[str, SecretStr] = {}  # sent with every POST (e.g. Authorization); never logged
    # HMAC-SHA256 key: each POST carries X-Linewatch-Signature: t=<unix time>,v1=<hex of HMAC(key, "t.body")>
    webhook_secret: SecretStr | None = None
    webhook_secret_file: str | None = None


@register_channel
class WebhookOutput(AlertChannel):
    """POSTs each alert as JSON, with an ``Idempotency-Key: <event_id>/<status>`` header that is
    the same on every attempt: a receiver that got an alert twice (an answer lost to a timeout,
    a restart between its answer and the channel's commit) can tell. Refused connections, DNS
    errors, 5xx and 429 are "not delivered" and retried; no answer within ``timeout_s`` once
    the request was sent is "unknown" (retried too); other statuses are refused. ``headers`` go
    with every POST (their values may be secrets: never logged); with ``secret``, an HMAC
    signature (``sign``) lets the receiver check the alert came from this sink, unchanged."""

    name = "webhook"
    Settings = WebhookSettings
    flags = (Flag("--webhook", "webhook", "POST each alert as JSON to this URL"),)

    @classmethod
    def from_settings(cls, settings: WebhookSettings, delivery: DeliveryPolicy) -> list[AlertChannel]:
        if not settings.webhook:
            return []
        key = secret(settings.webhook_secret, settings.webhook_secret_file, "alerts.webhook_secret_file")
        headers = {name: value.get_secret_value() for name, value in settings.webhook_headers.items()}
        return [cls(settings.webhook, timeout_s=delivery.timeout_s, headers=headers, secret=key)]

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
