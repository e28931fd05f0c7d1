"""The alert sink's consume loop (``linewatch sink alerts`` and the embedded run).

It reads ``bus.topics.scores`` (or a replay's results topic) in a consumer group. After each
poll it first follows the group's assignment: the streams of a partition it lost are dropped
and their queued alerts cancelled (the new owner delivers them); the state of a partition it
gained is restored from the changelog (``alert_state``) before any record of it is handled.
Then each record: a score or the end of a session goes to the tracker (``alerts``); anything
else, and any exception while handling one record, becomes a dead letter (stage
``sink-alerts``) and the loop goes on.

Checkpoints, when alerts were raised (at once: they are real-time), when a poll comes back
empty (caught up) and at least every ``commit_interval_s``: the changed states and the new
alerts' pending records are written to the changelog and acknowledged (with the dead
letters); then the alerts go into every output's queue, waiting while one is full
(backpressure); then the offsets are committed. Outputs deliver on their own threads
(``outputs.Delivery``), so a slow or dead webhook holds up no other output and no stream.
A stop (SIGTERM) checkpoints and lets each output finish what it has for a few seconds;
undelivered alerts stay pending for the next run. Open events stay open: a restarted sink
goes on with them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from collections.abc import Callable, Iterable

from ..bus import Bus, Record
from ..bus.messages import MessageError, ScoreMsg, SessionEnd, decode, encode
from .alert_state import AlertStore, state_topic
from .alerts import AlertPolicy, AlertTracker
from ..ops import metrics
from ..ops.health import HEALTH
from .outputs import AlertOutput, Delivery, Parcel
from .runner import _dead_letter, _turn

log = logging.getLogger(__name__)

STAGE = "sink-alerts"


@dataclass
class AlertSinkStats:
    scores: int = 0  # score records decoded
    ends: int = 0  # session ends read
    duplicates: int = 0  # scores and ends ignored as already seen
    late: int = 0  # scores that came after their seq had been given up on
    alerts: int = 0  # alerts raised by the tracker
    delivered: dict[str, int] = field(default_factory=dict)  # per output
    dead: int = 0  # dead letters published (bad records, alerts an output gave up on)


class AlertSink:
    """Scores -> AlertTracker -> outputs; state on the changelog (see the module docstring).
    ``run(stop)`` in a thread of its own; ``delivered()`` tells when every output is idle."""

    def __init__(self, bus: Bus, policy_for: Callable[[str], AlertPolicy], outputs: Iterable[AlertOutput], *,
                 group: str = "linewatch-alerts", topic: str | None = None, poll_s: float = 0.5,
                 max_records: int = 64, commit_interval_s: float = 5.0, queue_size: int = 256):
        self.bus, self.group, self.topic = bus, group, topic or bus.topics.scores
        self.poll_s, self.max_records, self.commit_interval_s = poll_s, max_records, commit_interval_s
        outputs = list(outputs)
        self.deliveries = {output.name: Delivery(output, queue_size) for output in outputs}
        if len(self.deliveries) != len(outputs) or "" in self.deliveries:
            raise ValueError("every alert output needs a name of its own")
        self.tracker = AlertTracker(policy_for)
        self.stats = AlertSinkStats()
        self.dead_lock = threading.Lock()  # dead letters come from the loop and the output threads

    def delivered(self) -> bool:
        return all(delivery.idle() for delivery in self.deliveries.values())

    def run(self, stop: threading.Event) -> AlertSinkStats:
        bus = self.bus
        consumer = bus.consumer([self.topic], self.group)
        self.producer = bus.producer()
        try:
            self.store = AlertStore(bus, state_topic(self.topic, self.group), len(consumer.partitions(self.topic)))
        except BaseException:
            consumer.close()
            raise
        for name, delivery in self.deliveries.items():
            delivery.start(partial(self._delivered, name=name), partial(self._failed, name=name))
        owned: set[int] = set()
        self.held: list[Record] = []  # handled, not committed
        self.raised: list[Parcel] = []  # raised, not checkpointed
        checkpointed = time.monotonic()
        try:
            while not stop.is_set():
                records = consumer.poll(self.poll_s, self.max_records)
                _turn(STAGE, consumer)
                owned = self._follow(consumer, owned, stop)
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
            for delivery in self.deliveries.values():
                delivery.close()
            self.stats.duplicates, self.stats.late = self.tracker.duplicates, self.tracker.late
            self.stats.delivered = {name: d.delivered for name, d in self.deliveries.items()}
            consumer.close()
            self.store.close()
            self.producer.close()
        return self.stats

    # ---- the loop's steps ------------------------------------------------------------
    def _follow(self, consumer, owned: set[int], stop: threading.Event) -> set[int]:
        """Take up the group's current assignment (see the module docstring)."""
        current = {p for topic, p in consumer.assignment() if topic == self.topic}
        lost, gained = owned - current, current - owned
        if lost:
            self.tracker.drop(lost)
            self.held = [r for r in self.held if r.partition not in lost]
            self.raised = [p for p in self.raised if p.partition not in lost]
            for delivery in self.deliveries.values():
                delivery.cancel(lost)
            log.info("alert sink: partitions %s went to another sink", sorted(lost))
        if gained:
            restored = self.store.restore(gained)
            for state in restored.states:
                self.tracker.load(state)
            for record, reason in restored.corrupt:
                log.warning("%s", reason)
                self._dead(reason, record=record)
            for name, parcel in restored.pending:
                if name in self.deliveries:
                    self.deliveries[name].put(parcel, stop)
                else:  # the output was configured when the alert was raised, and is no more
                    self._dead(f"alert output {name!r} is not configured any more; alert {parcel.alert.event_id} "
                               f"({parcel.alert.status}) was not delivered to it", parcel=parcel)
                    self.store.settle(name, parcel)
            events = sum(s.event is not None for state in restored.states for s in state.sessions.values())
            log.log(logging.INFO if restored.states or restored.pending else logging.DEBUG,
                    "alert sink: partitions %s restored: %d stream(s), %d open event(s), %d undelivered alert(s)",
                    sorted(gained), len(restored.states), events, len(restored.pending))
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
        for alert in alerts:
            metrics.ALERTS.labels(alert.stream, alert.status).inc()
        self.raised += [Parcel(alert, record.partition) for alert in alerts]

    def _checkpoint(self, consumer, stop: threading.Event) -> bool:
        """State and pending alerts written, alerts queued, offsets committed; False if a stop
        came while an output's queue was full (nothing committed: the next run redoes it)."""
        pending = [(name, parcel) for parcel in self.raised for name in self.deliveries]
        self.store.write(self.tracker.take_dirty(), pending)
        with self.dead_lock:
            self.producer.flush()  # dead letters acknowledged before their records are committed
        while self.raised:
            if not all(delivery.put(self.raised[0], stop) for delivery in self.deliveries.values()):
                return False
            self.raised.pop(0)
        if self.held:
            consumer.commit(self.held)
            self.held = []
        return True

    # ---- called from the output threads ------------------------------------------------
    def _delivered(self, parcel: Parcel, name: str) -> None:
        self.store.settle(name, parcel)

    def _failed(self, parcel: Parcel, reason: str, name: str) -> None:
        log.warning("alert %s (%s) -> dead letter: %s", parcel.alert.event_id, parcel.alert.status, reason)
        metrics.DEAD_LETTERS.labels(STAGE, "alert_output").inc()
        self._dead(reason, parcel=parcel)
        with self.dead_lock:
            self.producer.flush()
        self.store.settle(name, parcel)

    def _dead(self, reason: str, *, record: Record | None = None, parcel: Parcel | None = None,
              stream: str | None = None, seq: int | None = None) -> None:
        with self.dead_lock:
            if parcel is not None:
                _dead_letter(self.producer, self.bus, self.stats, reason, STAGE, payload=encode(parcel.alert),
                             stream=parcel.alert.stream, seq=parcel.alert.end_seq)
            else:
                _dead_letter(self.producer, self.bus, self.stats, reason, STAGE, record=record, stream=stream, seq=seq)


def run_alert_sink(bus: Bus, policy_for: Callable[[str], AlertPolicy], outputs: Iterable[AlertOutput], *,
                   stop: threading.Event, **options) -> AlertSinkStats:
    """``AlertSink(bus, policy_for, outputs, **options).run(stop)``."""
    return AlertSink(bus, policy_for, outputs, **options).run(stop)
