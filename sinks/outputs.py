"""Alert outputs, each delivered off the consume loop: a JSONL file, the alerts topic, a webhook.

An output (``AlertOutput``) makes one delivery attempt per ``send``: ``OutputError`` means
"try again later", ``OutputRefused`` "retrying cannot help". ``Delivery`` runs one output
behind its own bounded queue and thread: it retries a failed alert with exponential backoff
(``backoff_s``, 2x, 4x ... at most ``max_backoff_s``) up to ``retries`` times, then hands it
to ``on_failed`` (the sink dead-letters it). A full queue blocks ``put``: the consume loop
stops taking records (backpressure), nothing is dropped. Each output has its own thread, so
a dead webhook delays neither the file nor the topic, and no stream's alerts wait for it
until its queue is full.

An output that is failing says so once when the outage begins and once when it ends.
A new kind of output (MQTT, Apprise ...) is a subclass with a stable ``name`` (the sink keeps
undelivered alerts under it across restarts) and a ``send``; ``Delivery`` gives it the
queue, the thread, the retries and the bookkeeping.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from ..bus import BusError, Producer
from ..bus.messages import AlertMsg, encode
from ..ops import metrics

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Linewatch-Signature"
HEADER_NAME = re.compile(r"[A-Za-z0-9-]+")


class OutputError(RuntimeError):
    """One delivery attempt failed; worth trying again."""


class OutputRefused(OutputError):
    """The receiver refused the alert: retrying cannot help, it is dead-lettered at once."""


class AlertOutput(ABC):
    name: str = ""  # stable and unique among a sink's outputs
    retries: int = 5  # further attempts after the first
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

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


class BusOutput(AlertOutput):
    """Publishes each alert to ``topic`` keyed by stream."""

    name = "topic"

    def __init__(self, producer: Producer, topic: str):
        self.producer, self.topic = producer, topic

    def send(self, alert: AlertMsg) -> None:
        try:
            self.producer.send(self.topic, encode(alert), key=alert.stream.encode())
            self.producer.flush()
        except BusError as err:
            raise OutputError(str(err)) from None


class WebhookOutput(AlertOutput):
    """POSTs each alert as JSON, with an ``Idempotency-Key: <event_id>/<status>`` header: a kill
    between the receiver's answer and the sink recording it makes the sink POST it once more.
    Connection errors, timeouts, 5xx and 429 are retried; other 4xx are refused. ``headers``
    go with every POST (their values may be secrets: never logged); with ``secret``, an HMAC
    signature (``sign``) lets the receiver check the alert came from this sink, unchanged."""

    name = "webhook"

    def __init__(self, url: str, retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 5,
                 headers: dict[str, str] | None = None, secret: str | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"webhook URL must be http(s)://host[:port]/path, got {url!r}")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("webhook retries and backoff_s must be >= 0 and timeout_s > 0")
        for name, value in (headers or {}).items():
            if not HEADER_NAME.fullmatch(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"webhook header {name!r}: a name of letters, digits and -, and a value on one line")
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self.headers = {"Content-Type": "application/json", "User-Agent": "linewatch", **(headers or {})}
        self.secret = secret.encode() if secret else None

    def send(self, alert: AlertMsg) -> None:
        body = encode(alert)
        headers = {**self.headers, "Idempotency-Key": f"{alert.event_id}/{alert.status}",
                   "X-Linewatch-Event": alert.status}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as err:
            metrics.WEBHOOK_FAILURES.inc()
            error = OutputRefused if err.code != 429 and err.code < 500 else OutputError
            raise error(f"webhook {self.url}: HTTP {err.code} {err.reason}") from None
        except OSError as err:  # URLError (refused, DNS), timeouts, resets
            metrics.WEBHOOK_FAILURES.inc()
            raise OutputError(f"webhook {self.url}: {getattr(err, 'reason', None) or err}") from None


def sign(secret: bytes, body: bytes, at: int | None = None) -> str:
    """The ``X-Linewatch-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``.
    A receiver recomputes it and compares in constant time; the time lets it refuse old replays."""
    at = int(time.time()) if at is None else at
    digest = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={digest}"


@dataclass(frozen=True)
class Parcel:
    """One alert on its way through one output."""

    alert: AlertMsg
    partition: int  # of the scores topic it came from: its owner keeps it pending until delivered


class Delivery:
    """One output behind its own bounded queue and thread (see the module docstring).

    ``start(on_delivered, on_failed)``: the callbacks run on the delivery thread. ``close``
    keeps delivering what is queued while attempts succeed, for at most ``close_s``, and stops
    at the first failure: what is left stays pending in the sink's state for its next run."""

    def __init__(self, output: AlertOutput, capacity: int = 256, close_s: float = 5.0):
        if capacity < 1:
            raise ValueError("an output's queue holds at least one alert")
        self.output, self.capacity, self.close_s = output, capacity, close_s
        self.queue: deque[Parcel] = deque()
        self.cond = threading.Condition()
        self.current: Parcel | None = None
        self.closing = False
        self.revoked: set[int] = set()
        self.delivered = self.failed = 0
        self.failing = False  # an outage is on (logged once when it begins and once when it ends)
        self.thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.output.name

    def start(self, on_delivered: Callable[[Parcel], None], on_failed: Callable[[Parcel, str], None]) -> None:
        self.on_delivered, self.on_failed = on_delivered, on_failed
        self.thread = threading.Thread(target=self._run, name=f"alerts-{self.name}", daemon=True)
        self.thread.start()

    def put(self, parcel: Parcel, stop: threading.Event) -> bool:
        """Queue ``parcel``, waiting while the queue is full; False if ``stop`` came first."""
        with self.cond:
            while len(self.queue) >= self.capacity:
                if stop.is_set() or self.closing:
                    return False
                self.cond.wait(0.2)
            self.queue.append(parcel)
            self.cond.notify_all()
            return True

    def cancel(self, partitions: set[int]) -> None:
        """Drop what is queued for these partitions (their new owner delivers it) and wait
        until an attempt in flight for one of them has ended."""
        with self.cond:
            self.revoked = set(partitions)
            self.queue = deque(p for p in self.queue if p.partition not in partitions)
            self.cond.notify_all()
            while self.current is not None and self.current.partition in partitions:
                self.cond.wait(0.2)
            self.revoked = set()

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and self.current is None

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()
        self.output.close()

    # ---- the delivery thread ----------------------------------------------------------
    def _run(self) -> None:
        deadline = None
        while True:
            with self.cond:
                while not self.queue and not self.closing:
                    self.cond.wait()
                if self.closing:
                    deadline = deadline or time.monotonic() + self.close_s
                    if not self.queue or time.monotonic() > deadline:
                        return
                parcel = self.current = self.queue.popleft()
                self.cond.notify_all()
            outcome, reason = self._deliver(parcel)
            try:
                if outcome == "delivered":
                    self.delivered += 1
                    self.on_delivered(parcel)
                elif outcome == "failed":
                    self.failed += 1
                    self.on_failed(parcel, reason)
            except Exception as err:  # noqa: BLE001 - the bookkeeping failed: it stays pending, is redone later
                log.warning("alerts output %s: could not record the outcome for %s (%s)", self.name,
                            parcel.alert.event_id, err)
            with self.cond:
                self.current = None
                self.cond.notify_all()
                if outcome == "abandoned" and self.closing:
                    return

    def _deliver(self, parcel: Parcel) -> tuple[str, str]:
        """("delivered" | "failed" | "abandoned", reason); abandoned: left pending (closing, or
        its partition went to another sink)."""
        output, alert = self.output, parcel.alert
        for attempt in range(output.retries + 1):
            try:
                output.send(alert)
                if self.failing:
                    self.failing = False
                    log.info("alerts output %s works again", self.name)
                return "delivered", ""
            except OutputRefused as err:
                return "failed", f"{self.name} refused alert {alert.event_id} ({alert.status}): {err}"
            except Exception as err:  # noqa: BLE001 - OutputError, or a bug in the output: both retried
                error = str(err) if isinstance(err, OutputError) else f"{type(err).__name__}: {err}"
            if not self.failing:
                self.failing = True
                log.warning("alerts output %s is failing (%s); retrying with backoff", self.name, error)
            if attempt < output.retries:
                with self.cond:  # back off; a close, or the partition going elsewhere, ends the wait
                    self.cond.wait_for(lambda: self.closing or parcel.partition in self.revoked,
                                       min(output.backoff_s * 2 ** attempt, output.max_backoff_s))
            if self.closing or parcel.partition in self.revoked:
                return "abandoned", error
        return "failed", (f"{self.name}: alert {alert.event_id} ({alert.status}) not delivered after "
                          f"{output.retries + 1} attempt(s); last error: {error}")

