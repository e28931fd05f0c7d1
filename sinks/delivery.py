"""Alert channels as independent consumers of the alerts topic.

The alert sink decides alerts and writes them to the alerts topic (``alert_sink``); that topic
is the channels' source of truth. Each channel (JSONL, webhook, MQTT, Apprise) reads it in a
consumer group of its own (``<alerts topic>.<channel name>``) on a thread of its own and
commits an alert's offset only once the channel took it or it was finally dead-lettered. So
a channel that is down grows its own backlog (durable, on the broker: a restarted sink goes
on where the channel stopped) and holds back neither the sink nor another channel; its lag
is ``linewatch_channel_lag_records{channel}``. Within a channel, alerts are delivered in the
order of their partition (each stream's in order). A channel added to a running deployment
begins at the topic's end (``Channel._began``), not at its history.

Each alert: an ``OutputError`` is retried after a backoff (``DeliveryPolicy``: doubling up
to ``max_backoff_s``) up to ``attempts``; an ``OutputUnknown`` (a timeout after sending) is
retried the same way with the same alert (the same idempotency key), and counts as "may have
been delivered"; ``OutputRefused`` is dead-lettered at once; an alert decided more than
``max_age_s`` ago is dead-lettered instead of sent. A dead letter says how many attempts were
made and whether any may have reached the receiver. A stop in the middle of the retries
leaves the alert uncommitted: the next run tries it again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..bus import Bus, Record
from ..bus.messages import AlertMsg, MessageError, decode
from ..ops import metrics
from ..ops.health import HEALTH, Health
from .channels.base import AlertChannel, OutputError, OutputRefused, OutputUnknown

log = logging.getLogger(__name__)

REMEMBERED = 10_000  # alerts delivered lately, by (event_id, status): a duplicate on the topic is skipped


def channel_group(alerts_topic: str, channel: str) -> str:
    return f"{alerts_topic}.{channel}"


class Channel:
    """One channel's consumer of ``topic`` (see the module docstring). ``dead(reason, alert,
    record)`` publishes a dead letter and returns once it is acknowledged. Its thread beats
    ``health`` as the loop ``channel-<name>`` (each poll and each attempt): a thread that dies
    or hangs makes ``/healthz`` fail once the beat is older than one attempt plus the longest
    backoff, twice over, so the orchestrator restarts the sink instead of a channel going quiet."""

    def __init__(self, bus: Bus, output: AlertChannel, topic: str, dead: Callable[[str, AlertMsg | None, Record], None],
                 *, poll_s: float = 0.5, batch: int = 16, health: Health = HEALTH):
        self.bus, self.output, self.topic, self.dead = bus, output, topic, dead
        self.health, self.loop = health, f"channel-{output.name}"
        self.policy = output.delivery
        self.bound_s = 2 * (self.policy.timeout_s + self.policy.max_backoff_s) + poll_s + 5.0
        self.group = channel_group(topic, output.name)
        self.poll_s, self.batch = poll_s, batch
        self.delivered = self.failed = 0
        self.recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.owned: set[int] = set()  # the partitions of the topic the group gives this channel now
        self.idle_at: dict[int, int] | None = None  # partition -> end offset before the last empty poll
        self.failing = False  # an outage is on: said once when it begins and once when it ends
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.output.name

    def start(self, stop: threading.Event) -> None:
        """Join the group now (so no alert written after this is missed), deliver on a thread."""
        self.stop = stop
        self.began = self._began()
        self.consumer = self.bus.consumer([self.topic], self.group)
        self.bus.unpaced(self.group)
        self.probe = self.bus.consumer([], None)  # end offsets, for ``caught_up`` (any thread)
        self.thread = threading.Thread(target=self._run, name=f"channel-{self.name}", daemon=True)
        self.thread.start()

    def caught_up(self) -> bool:
        """Every alert on this channel's partitions of the topic delivered or dead-lettered, as of
        the channel's last empty poll (exact on the in-process bus; the embedded run waits on it)."""
        with self.lock:
            if self.idle_at is None:
                return False
            ends = self.probe.end_offsets(self.topic) or {}
            return all(self.idle_at.get(p, 0) >= ends.get(p, 0) for p in self.owned)

    def _began(self) -> dict[int, int]:
        """Where on the alerts topic this channel began, per partition: a channel added to a
        running deployment takes the alerts decided from then on, not the topic's history. The
        first run of a channel writes its start to ``<alerts topic>.channels`` (compacted, keyed
        by channel); later runs read it back, so a backlog it never delivered stays its own."""
        registry = f"{self.topic}.channels"
        self.bus.ensure_topics([registry], partitions=1, compact=True)
        reader = self.bus.consumer([], None)
        try:
            reader.assign(registry, [0])
            reader.seek(registry, 0, 0)
            began: dict[int, int] | None = None
            while (reader.end_offsets(registry) or {0: 1}).get(0) and (batch := reader.poll(0.5, 1000)):
                for record in batch:
                    if record.key == self.name.encode() and record.value:
                        offsets = {int(p): int(o) for p, o in json.loads(record.value).items()}
                        began = offsets if began is None else {p: min(o, began.get(p, o)) for p, o in offsets.items()}
            if began is None:  # new: from the topic's end now, before the sink publishes anything
                began = reader.end_offsets(self.topic) or {}
                producer = self.bus.producer()
                producer.send(registry, json.dumps(began).encode(), key=self.name.encode(), partition=0)
                producer.close()
                if any(began.values()):
                    log.info("alert channel %s is new: it takes the alerts decided from now on", self.name)
            return began
        finally:
            reader.close()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()
        self.output.close()

    # ---- the channel's thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            ends = None
            while not self.stop.is_set():
                self.health.beat(self.loop, self.bound_s)
                records = self.consumer.poll(self.poll_s, self.batch)
                self._measure(len(records))
                with self.lock:
                    self.owned = {p for topic, p in self.consumer.assignment() if topic == self.topic}
                    if not records and ends is not None:  # nothing beyond: every alert up to ``ends`` is done
                        self.idle_at = ends
                # asked only while idle (a request to the broker), before the poll it stands for
                ends = None if records else (self.consumer.end_offsets(self.topic) or {})
                done: list[Record] = []
                for record in records:
                    if not self._deliver(record, done):
                        break  # a stop mid-retries: this one and the rest stay uncommitted
                    done.append(record)
                self._commit(done)
        except Exception:  # noqa: BLE001 - a bug here must not pass silently: said, and /healthz fails
            log.exception("alert channel %s stopped: /healthz fails once its beat is %.0f s old", self.name,
                          self.bound_s)
        else:
            self.health.stop_beating(self.loop)  # stopped on purpose
        finally:
            self.consumer.close()
            with self.lock:
                self.probe.close()

    def _commit(self, done: list[Record]) -> None:
        if not done:
            return
        self.consumer.commit(done)
        done.clear()

    def _measure(self, holding: int) -> None:
        lag = self.consumer.lag()
        metrics.CHANNEL_LAG.labels(self.name).set(sum((lag or {}).values()) + holding)

    def _deliver(self, record: Record, done: list[Record]) -> bool:
        """True once ``record`` is done with (delivered, skipped or dead-lettered); False on a stop."""
        if record.offset < self.began.get(record.partition, 0):
            return True  # decided before this channel was configured
        try:
            alert = decode(record.value, AlertMsg)
        except MessageError as err:
            self._dead(f"alert channel {self.name}: not an alert ({err})", None, record)
            return True
        key = (alert.event_id, alert.status)
        if key in self.recent:
            return True
        attempts, maybe, error = 0, False, ""
        while True:
            age = time.time() - record.timestamp_ms / 1000
            metrics.CHANNEL_OLDEST_AGE.labels(self.name).set(max(age, 0.0))
            if self.policy.max_age_s and age > self.policy.max_age_s:
                self._dead(self._gave_up(alert, attempts, maybe, error,
                                         f"older than max_age_s ({age:.0f} s > {self.policy.max_age_s:g} s)"), alert, record)
                return True
            attempts += 1
            self.health.beat(self.loop, self.bound_s)
            try:
                self.output.send(alert)
                break
            except OutputRefused as err:
                self._dead(self._gave_up(alert, attempts, maybe, str(err), "refused"), alert, record)
                return True
            except Exception as err:  # noqa: BLE001 - OutputError, or a bug in the output: both retried
                maybe = maybe or isinstance(err, OutputUnknown)
                error = str(err) if isinstance(err, OutputError) else f"{type(err).__name__}: {err}"
            if not self.failing:
                self.failing = True
                log.warning("alert channel %s is failing (%s); retrying with backoff, the other channels go on",
                            self.name, error)
            if self.policy.attempts and attempts >= self.policy.attempts:
                self._dead(self._gave_up(alert, attempts, maybe, error, "gave up"), alert, record)
                return True
            self._commit(done)  # what is done stays done while this one waits
            if self.stop.wait(self.policy.backoff(attempts)):
                return False
        if self.failing:
            self.failing = False
            log.info("alert channel %s works again", self.name)
        self.delivered += 1
        self._remember(key)
        metrics.CHANNEL_OLDEST_AGE.labels(self.name).set(0.0)
        return True

    def _gave_up(self, alert: AlertMsg, attempts: int, maybe: bool, error: str, why: str) -> str:
        received = ("may have been delivered (an attempt got no answer after sending)" if maybe
                    else "not delivered")
        return (f"alert channel {self.name}: alert {alert.event_id} ({alert.status}) {received}; {why} after "
                f"{attempts} attempt(s)" + (f"; last error: {error}" if error else ""))

    def _dead(self, reason: str, alert: AlertMsg | None, record: Record) -> None:
        log.warning("%s -> dead letter", reason)
        metrics.DEAD_LETTERS.labels("sink-alerts", "alert_channel").inc()
        self.failed += 1
        self.dead(reason, alert, record)  # acknowledged before the offset is committed
        if alert is not None:
            self._remember((alert.event_id, alert.status))
        metrics.CHANNEL_OLDEST_AGE.labels(self.name).set(0.0)

    def _remember(self, key: tuple[str, str]) -> None:
        self.recent[key] = None
        if len(self.recent) > REMEMBERED:
            self.recent.popitem(last=False)
