"""Replay compare: which events each of two results topics raised (the live scores topic and a
replay's, or two replays with different methods).

The events are computed here from the scores, with the same tracker and policies as the alert
sink (``sinks.events``), so a replay topic needs no alert sink of its own. Two events match
when they are of the same stream and session and their frame ranges overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..bus import Bus, BusError, Topics
from ..bus.memory import MemoryBus
from ..bus.messages import MessageError, ScoreMsg, SessionEnd, decode
from ..sinks.events import AlertPolicy, AlertTracker
from .store import session_of

IDLE_S = 1.0  # an empty poll this long ends the read where the bus cannot tell its end


def results_topics(bus: Bus) -> list[str]:
    """Topics holding scores: ``<prefix>.scores`` and replays' ``<prefix>.replay.*``."""
    prefix = bus.topics.prefix
    return [name for name in bus.topic_names()
            if name == bus.topics.scores or name.startswith(f"{prefix}.replay.")]


def compare_offer(bus: Bus | None, servers: str | None) -> dict:
    """What Compare can read: ``topics`` (results topics on this console's bus; none without
    one), ``bus`` ("kafka", "embedded": a ``linewatch run``'s in-process bus, or None), and
    ``replay``: the command that puts a second result set on another topic."""
    if bus is None:
        return {"topics": [], "bus": None, "scores": None, "replay": None}
    prefix = bus.topics.prefix
    # an embedded run's frames are gone with it: the replay is of a run on Kafka (compose's broker
    # is localhost:9094 from the host)
    prefix_flag = "" if prefix == Topics().prefix else f" --topic-prefix {prefix}"
    replay = (f"linewatch replay --bootstrap-servers {servers or 'localhost:9094'}{prefix_flag} "
              f"--method winclip --results-topic {prefix}.replay.winclip")
    return {"topics": results_topics(bus), "bus": "embedded" if isinstance(bus, MemoryBus) else "kafka",
            "scores": bus.topics.scores, "replay": replay}


def topic_events(bus: Bus, topic: str, policy_for: Callable[[str], AlertPolicy], limit: int = 2_000_000) -> list[dict]:
    """Every event the scores on ``topic`` raise, its latest status each."""
    consumer = bus.consumer([], None)
    try:
        partitions = consumer.partitions(topic)
        consumer.assign(topic, partitions)
        for p in partitions:
            consumer.seek(topic, p, 0)
        ends = consumer.end_offsets(topic)
        tracker, events, read = AlertTracker(policy_for), {}, 0
        position = {p: 0 for p in partitions}
        idle_since = time.monotonic()
        while read < limit:
            if ends is not None and all(position[p] >= ends.get(p, 0) for p in partitions):
                break
            records = consumer.poll(0.2, 1024)
            if not records:
                if time.monotonic() - idle_since > IDLE_S:
                    break
                continue
            idle_since = time.monotonic()
            for record in records:
                read += 1
                position[record.partition] = record.offset + 1
                try:
                    message = decode(record.value, ScoreMsg, SessionEnd)
                except MessageError:
                    continue
                try:
                    alerts = tracker.end(message, record.partition) if isinstance(message, SessionEnd) \
                        else tracker.push(message, record.partition)
                except ValueError:  # a non-finite score: the alert sink dead-letters it
                    continue
                for alert in alerts:
                    events[alert.event_id] = alert
    finally:
        consumer.close()
    return [{"event_id": a.event_id, "stream": a.stream, "session": session_of(a), "status": a.status,
             "start_seq": a.start_seq, "end_seq": a.end_seq, "start_ts": a.start_ts, "end_ts": a.end_ts,
             "peak_score": a.peak_score, "peak_seq": a.peak_seq, "method": a.method}
            for a in sorted(events.values(), key=lambda a: (a.stream, a.start_ts))]


def compare(bus: Bus, a: str, b: str, policy_for: Callable[[str], AlertPolicy]) -> dict:
    known = set(bus.topic_names())
    for topic in (a, b):
        if topic not in known:
            raise BusError(f"no topic {topic!r} on the bus")
    left, right = topic_events(bus, a, policy_for), topic_events(bus, b, policy_for)

    def overlaps(x: dict, y: dict) -> bool:
        return (x["stream"], x["session"]) == (y["stream"], y["session"]) and \
            x["start_seq"] <= y["end_seq"] and y["start_seq"] <= x["end_seq"]

    both = [{"a": x, "b": [y for y in right if overlaps(x, y)]} for x in left]
    return {"a": a, "b": b, "both": [pair for pair in both if pair["b"]],
            "only_a": [pair["a"] for pair in both if not pair["b"]],
            "only_b": [y for y in right if not any(overlaps(x, y) for x in left)],
            "counts": {"a": len(left), "b": len(right)}}
