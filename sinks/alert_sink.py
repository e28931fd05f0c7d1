"""The alert sink's consume loop (``linewatch sink alerts`` and the embedded run).

It reads ``bus.topics.scores`` (or a replay's results topic) in a consumer group. After each
poll it first follows the group's assignment: the streams of a partition it lost are dropped
(the new owner goes on with them); the state of a partition it gained is restored from the
changelog (``alert_state``) before any record of it is handled. Then each record: a score or
the end of a session goes to the tracker (``alerts``); anything else, and any exception while
handling one record, becomes a dead letter (stage ``sink-alerts``) and the loop goes on.

Checkpoints, when alerts were raised (at once: they are real-time), when a poll comes back
empty (caught up) and at least every ``commit_interval_s``: the changed states and the new
alerts' pending records are written to the changelog and acknowledged (with the dead
letters); then the alerts are published to the alerts topic and acknowledged; then the
offsets are committed. The alerts topic is where the channels (JSONL, webhook, MQTT,
Apprise) take them from, each as its own consumer on its own thread (``delivery``): the loop
never waits for a channel, and a channel that is down only grows its own backlog. With
``alerts.publish`` off the sink writes to a topic of its own instead
(``<scores topic>.<group>.alerts``), read by its channels only.

A stop (SIGTERM) checkpoints and ends the channels' attempts; what a channel has not
delivered stays on its backlog for the next run. Open events stay open: a restarted sink
goes on with them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

from ..bus import Bus, BusError, Record, RecordTooLarge
from ..bus.messages import AlertMsg, MessageError, ScoreMsg, SessionEnd, decode, encode
from .alert_state import TOPIC, AlertStore, Parcel, state_topic
from .events import AlertPolicy, AlertTracker
from ..ops import metrics
from ..ops.health import HEALTH
from .delivery import Channel
from .channels.base import AlertChannel
from .plumbing import dead_letter, turn

log = logging.getLogger(__name__)

STAGE = "sink-alerts"


def private_alerts_topic(scores_topic: str, group: str) -> str:
    """The alerts topic of a sink that does not publish to the shared one."""
    return f"{scores_topic}.{group}.alerts"


@dataclass
class AlertSinkStats:
    scores: int = 0  # score records decoded
    ends: int = 0  # session ends read
    duplicates: int = 0  # scores and ends ignored as already seen
    late: int = 0  # scores that came after their seq had been given up on
    alerts: int = 0  # alerts raised by the tracker
    opened: int = 0  # of those, events opened
    delivered: dict[str, int] = field(default_factory=dict)  # per channel, this run
    dead: int = 0  # dead letters published (bad records, alerts a channel gave up on)


class AlertSink:
    """Scores -> AlertTracker -> alerts topic -> channels (see the module docstring).
    ``run(stop)`` in a thread of its own; ``delivered()`` tells when every channel has caught up."""

    def __init__(self, bus: Bus, policy_for: Callable[[str], AlertPolicy], channels: Iterable[AlertChannel], *,
                 group: str | None = None, topic: str | None = None, publish: bool = True,
                 poll_s: float = 0.5, max_records: int = 64, commit_interval_s: float = 5.0):
        self.bus, self.group, self.topic = bus, group or bus.topics.group("alerts"), topic or bus.topics.scores
        self.alerts_topic = bus.topics.alerts if publish else private_alerts_topic(self.topic, self.group)
        self.poll_s, self.max_records, self.commit_interval_s = poll_s, max_records, commit_interval_s
        outputs = list(channels)
        self.channels = [Channel(bus, output, self.alerts_topic, self._channel_dead, poll_s=poll_s)
                         for output in outputs]
        names = {channel.name for channel in self.channels}
        if len(names) != len(outputs) or "" in names:
            raise ValueError("every alert channel needs a name of its own")
        self.tracker = AlertTracker(policy_for)
        self.stats = AlertSinkStats()
        self.dead_lock = threading.Lock()  # dead letters come from the loop and the channel threads
        self.started = False

    def delivered(self) -> bool:
        return self.started and all(channel.caught_up() for channel in self.channels)

    def run(self, stop: threading.Event) -> AlertSinkStats:
        bus = self.bus
        bus.ensure_topics([self.alerts_topic])
        consumer = bus.consumer([self.topic], self.group)
        self.producer = bus.producer()
        try:
            self.store = AlertStore(bus, state_topic(self.topic, self.group), len(consumer.partitions(self.topic)))
        except BaseException:
            consumer.close()
            raise
        channels_stop = threading.Event()
        for channel in self.channels:  # each joins its group before the first alert is published
            channel.start(channels_stop)
        self.started = True
        owned: set[int] = set()
        self.held: list[Record] = []  # handled, not committed
        self.raised: list[Parcel] = []  # raised, not on the alerts topic yet
        self.superseded: list[tuple[str, Parcel]] = []  # an older sink's per-output pending records
        checkpointed = time.monotonic()
        try:
            while not stop.is_set():
                records = consumer.poll(self.poll_s, self.max_records)
                turn(STAGE, consumer)
                owned = self._follow(consumer, owned)
                records = [r for r in records if r.partition in owned]
                for record in records:
                    self._handle(record)
                self.held += records
                due = time.monotonic() - checkpointed >= self.commit_interval_s
                if self.raised or (self.held and (not records or due)):
                    if not self._checkpoint(consumer, stop):
                        break
                    checkpointed = time.monotonic()
            else:
                self._checkpoint(consumer, stop)
        finally:
            HEALTH.stop_beating(STAGE)
            channels_stop.set()
            for channel in self.channels:
                channel.join()
            self.stats.duplicates, self.stats.late = self.tracker.duplicates, self.tracker.late
            self.stats.delivered = {channel.name: channel.delivered for channel in self.channels}
            consumer.close()
            self.store.close()
            self.producer.close()
        return self.stats

    # ---- the loop's steps ------------------------------------------------------------
    def _follow(self, consumer, owned: set[int]) -> set[int]:
        """Take up the group's current assignment (see the module docstring)."""
        current = {p for topic, p in consumer.assignment() if topic == self.topic}
        lost, gained = owned - current, current - owned
        if lost:
            self.tracker.drop(lost)
            self.held = [r for r in self.held if r.partition not in lost]
            self.raised = [p for p in self.raised if p.partition not in lost]
            self.superseded = [(name, p) for name, p in self.superseded if p.partition not in lost]
            log.info("alert sink: partitions %s went to another sink", sorted(lost))
        if gained:
            restored = self.store.restore(gained)
            for state in restored.states:
                self.tracker.load(state)
            for record, reason in restored.corrupt:
                log.warning("%s", reason)
                self._dead(reason, record=record)
            seen = set()
            for name, parcel in restored.pending:  # published once more: the channels skip what they have
                if name != TOPIC:
                    self.superseded.append((name, parcel))
                if (parcel.alert.event_id, parcel.alert.status) not in seen:
                    seen.add((parcel.alert.event_id, parcel.alert.status))
                    self.raised.append(parcel)
            events = sum(s.event is not None for state in restored.states for s in state.sessions.values())
            log.log(logging.INFO if restored.states or restored.pending else logging.DEBUG,
                    "alert sink: partitions %s restored: %d stream(s), %d open event(s), %d unpublished alert(s)",
                    sorted(gained), len(restored.states), events, len(seen))
        return current

    def _handle(self, record: Record) -> None:
        stream = seq = None
        try:
            message = decode(record.value, ScoreMsg, SessionEnd)
            if isinstance(message, SessionEnd):
                stream = message.stream
                self.stats.ends += 1
                alerts = self.tracker.end(message, record.partition)
            else:
                stream, seq = message.frame.stream, message.frame.seq
                self.stats.scores += 1
                metrics.SCORES_RECEIVED.labels(STAGE).inc()
                alerts = self.tracker.push(message, record.partition)
        except Exception as err:  # noqa: BLE001 - one record never stops the partition
            reason = str(err) if isinstance(err, MessageError) else f"{type(err).__name__}: {err}"
            metrics.DEAD_LETTERS.labels(STAGE, "bad_score" if isinstance(err, MessageError) else "error").inc()
            self._dead(reason, record=record, stream=stream, seq=seq)
            return
        self.stats.alerts += len(alerts)
        self.stats.opened += sum(alert.status == "open" for alert in alerts)
        for alert in alerts:
            metrics.ALERTS.labels(alert.stream, alert.status).inc()
        self.raised += [Parcel(alert, record.partition) for alert in alerts]

    def _checkpoint(self, consumer, stop: threading.Event) -> bool:
        """State and pending alerts written, alerts published, offsets committed; False if a stop
        came while the alerts topic could not be written (nothing committed: the next run redoes it)."""
        self.store.write(self.tracker.take_dirty(), [(TOPIC, parcel) for parcel in self.raised])
        with self.dead_lock:
            self.producer.flush()  # dead letters acknowledged before their records are committed
        if self.raised:
            if not self._publish(stop):
                return False
            self.store.settle([(TOPIC, parcel) for parcel in self.raised] + self.superseded)
            self.raised, self.superseded = [], []
        if self.held:
            consumer.commit(self.held)
            self.held = []
        return True

    def _publish(self, stop: threading.Event) -> bool:
        """``raised`` on the alerts topic, acknowledged; retried while the broker fails, until a stop."""
        attempt = 0
        while True:
            try:
                with self.dead_lock:
                    for parcel in list(self.raised):
                        try:
                            self.producer.send(self.alerts_topic, encode(parcel.alert),
                                               key=parcel.alert.stream.encode())
                        except RecordTooLarge as err:
                            self.raised.remove(parcel)
                            dead_letter(self.producer, self.bus, self.stats, f"alert too large to publish: {err}",
                                         STAGE, payload=None, stream=parcel.alert.stream, seq=parcel.alert.end_seq)
                    self.producer.flush()
                if attempt:
                    log.info("alert sink: the alerts topic %s takes alerts again", self.alerts_topic)
                return True
            except BusError as err:
                if not attempt:
                    log.warning("alert sink: cannot publish to the alerts topic %s (%s); retrying", self.alerts_topic, err)
                if stop.wait(min(0.5 * 2 ** attempt, 30.0)):
                    return False
                attempt += 1

    # ---- called from the channel threads ------------------------------------------------
    def _channel_dead(self, reason: str, alert: AlertMsg | None, record: Record) -> None:
        if alert is None:
            self._dead(reason, record=record)
        else:
            with self.dead_lock:
                dead_letter(self.producer, self.bus, self.stats, reason, STAGE, payload=record.value,
                             stream=alert.stream, seq=alert.end_seq)
        with self.dead_lock:
            self.producer.flush()

    def _dead(self, reason: str, *, record: Record | None = None, stream: str | None = None,
              seq: int | None = None) -> None:
        with self.dead_lock:
            dead_letter(self.producer, self.bus, self.stats, reason, STAGE, record=record, stream=stream, seq=seq)


def run_alert_sink(bus: Bus, policy_for: Callable[[str], AlertPolicy], channels: Iterable[AlertChannel], *,
                   stop: threading.Event, **options) -> AlertSinkStats:
    """``AlertSink(bus, policy_for, channels, **options).run(stop)``."""
    return AlertSink(bus, policy_for, channels, **options).run(stop)
