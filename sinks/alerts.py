"""Per-stream alerting: scores in (at-least-once, roughly in order) -> anomalous events out.

Per stream, scores pass a de-duplicating reorder buffer and are then judged in seq order:

- **Debounce (k of n).** An event opens when at least ``k`` of the last ``n`` sequence numbers
  are anomalous. The window counts seq numbers, not arrivals: a frame that never came (it was
  dead-lettered) counts as normal. The event starts at the first anomalous frame of that
  window, so ``event_id = "<stream>:<start_seq>"`` is the same on every replay of the frames.
- **Quiet and close (hysteresis).** An open event goes quiet when ``n`` consecutive seq numbers
  hold no anomalous frame. It closes once it has stayed quiet for ``cooldown_s`` seconds of
  capture time (``frame.ts``), counted from the frame that made it quiet; with the default
  ``cooldown_s=0`` it closes on that very frame.
- **Cool-down merges.** If the k-of-n rule fires again while the event is quiet, the new
  anomalous frames join the same event (no second "open" alert), so a flickering defect makes
  one event rather than a storm. A lone anomalous frame during cool-down does not re-arm it.
- **Alerts.** ``status="open"`` when an event opens (the real-time alert) and ``"closed"``
  when it ends; both carry the frames, peak and telemetry known at that point.

De-duplication: a seq at or below the stream's release watermark, or already buffered, is
ignored (re-scored frames, replays). The buffer releases the next expected seq at once and,
when it holds more than ``reorder_window`` scores, gives up on the missing seq and releases
the lowest buffered one, so a gap never stalls a stream. A score arriving after its seq was
passed over is dropped and counted as late. A stream seen first at seq 0 starts there at
once; one first seen mid-way (the sink restarted) starts at its lowest seq once the buffer
overflows or the stream goes idle, so early reordering there is not mistaken for a gap.

Outputs (``JsonlOutput``, ``BusOutput``, ``WebhookOutput``) deliver each alert; an output
that gives up on one raises ``OutputError`` and the runner dead-letters that alert.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..bus import Producer
from ..bus.messages import AlertMsg, ScoreMsg, encode, track
from ..ops import metrics


class AlertPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float | None = Field(default=None, allow_inf_nan=False)  # None: each score's own threshold
    k: int = Field(default=2, ge=1)  # anomalous frames among the last n that open an event
    n: int = Field(default=3, ge=1)  # window length in frames; n normal frames in a row make it quiet
    cooldown_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # quiet time before "closed"
    reorder_window: int = Field(default=16, ge=0)  # scores held back waiting for a missing seq

    @model_validator(mode="after")
    def _k_within_n(self) -> AlertPolicy:
        if self.k > self.n:
            raise ValueError(f"k={self.k} must not exceed n={self.n} (k of the last n frames)")
        return self

    def is_anomalous(self, score: ScoreMsg) -> bool:
        # without a policy threshold the worker's own decision (score >= its threshold) stands
        return score.anomalous if self.threshold is None else score.image_score >= self.threshold

    def threshold_of(self, score: ScoreMsg) -> float:
        return score.threshold if self.threshold is None else self.threshold


class _Event:
    """An event's summary. Only the peak score is kept whole: an event can last minutes, and
    keeping every anomalous frame's message (JPEG included) would grow without bound."""

    def __init__(self, frames: list[ScoreMsg]):
        self.start = frames[0].frame
        self.end = self.start
        self.peak = frames[0]
        self.frames: list[int] = []  # anomalous frames' seqs, ascending
        self.quiet_since_ts: float | None = None  # capture time at which it went quiet; None while active
        for score in frames:
            self.add(score)

    def add(self, score: ScoreMsg) -> None:
        self.frames.append(score.frame.seq)
        self.end = score.frame
        if score.image_score > self.peak.image_score:  # the first frame wins a tie
            self.peak = score


@dataclass
class _Stream:
    policy: AlertPolicy
    watermark: int | None = None  # highest seq released (or passed over)
    buffer: dict[int, ScoreMsg] = field(default_factory=dict)
    recent: deque = field(default_factory=deque)  # anomalous scores within the last n seqs
    skipped: deque = field(default_factory=lambda: deque(maxlen=64))  # recent gaps (first, last seq)
    event: _Event | None = None
    last_arrival: float = 0.0  # monotonic clock, for idle flushes


class AlertTracker:
    """Turns a stream of ScoreMsg into open/closed AlertMsg (see the module docstring)."""

    def __init__(self, policy_for: Callable[[str], AlertPolicy], clock: Callable[[], float] = time.monotonic):
        self.policy_for = policy_for
        self.clock = clock
        self.streams: dict[str, _Stream] = {}
        self.scores = self.duplicates = self.late = 0

    def push(self, score: ScoreMsg) -> list[AlertMsg]:
        stream = track(score.frame)  # a new ingest session of a stream starts afresh at seq 0
        state = self.streams.get(stream)
        if state is None:
            state = self.streams[stream] = _Stream(self.policy_for(score.frame.stream))
        state.last_arrival = self.clock()
        seq = score.frame.seq
        if state.watermark is not None and seq <= state.watermark and any(a <= seq <= b for a, b in state.skipped):
            self.late += 1  # its seq was given up on to keep the stream moving
            return []
        if seq in state.buffer or (state.watermark is not None and seq <= state.watermark):
            self.duplicates += 1
            return []
        self.scores += 1
        state.buffer[seq] = score
        return self._release(state, force=False)

    def flush(self, stream: str | None = None) -> list[AlertMsg]:
        """End of stream (shutdown, end of a file): release every buffered score and close open
        events, of one stream or of all."""
        alerts: list[AlertMsg] = []
        for name in [stream] if stream is not None else list(self.streams):
            state = self.streams.get(name)
            if state is None:
                continue
            alerts += self._release(state, force=True)
            if state.event is not None:
                alerts.append(self._alert(state, "closed"))
                state.event = None
            state.recent.clear()  # a stream that resumes later starts a fresh window
        return alerts

    def flush_idle(self, idle_s: float) -> list[AlertMsg]:
        """Flush the streams that have had no score for ``idle_s`` seconds but still hold
        buffered scores or an open event."""
        now = self.clock()
        alerts: list[AlertMsg] = []
        for name, state in self.streams.items():
            if (state.buffer or state.event is not None) and now - state.last_arrival >= idle_s:
                alerts += self.flush(name)
        return alerts

    def buffered(self) -> set[tuple[str, int]]:
        """(track, seq) of scores still held in reorder buffers (not yet judged)."""
        return {(name, seq) for name, state in self.streams.items() for seq in state.buffer}

    # ---- internals ------------------------------------------------------------------------
    def _release(self, state: _Stream, force: bool) -> list[AlertMsg]:
        alerts: list[AlertMsg] = []
        while state.buffer:
            lowest = min(state.buffer)
            # a new stream starts at seq 0; one joined mid-way (sink restart) waits for the window
            expected = lowest == (0 if state.watermark is None else state.watermark + 1)
            if not (expected or force or len(state.buffer) > state.policy.reorder_window):
                break
            if not expected and state.watermark is not None:
                state.skipped.append((state.watermark + 1, lowest - 1))
            alerts += self._judge(state, state.buffer.pop(lowest))
            state.watermark = lowest
        return alerts

    def _judge(self, state: _Stream, score: ScoreMsg) -> list[AlertMsg]:
        policy, seq = state.policy, score.frame.seq
        while state.recent and state.recent[0].frame.seq <= seq - policy.n:
            state.recent.popleft()
        anomalous = policy.is_anomalous(score)
        if anomalous:
            state.recent.append(score)
        event = state.event
        if event is None:
            if len(state.recent) >= policy.k:
                state.event = _Event(list(state.recent))
                return [self._alert(state, "open")]
            return []
        if event.quiet_since_ts is None:
            if anomalous:
                event.add(score)
            elif seq - event.end.seq >= policy.n:
                event.quiet_since_ts = score.frame.ts
        elif len(state.recent) >= policy.k:  # fired again during cool-down: merge, stay open
            for recent in [s for s in state.recent if s.frame.seq > event.end.seq]:
                event.add(recent)
            event.quiet_since_ts = None
        if event.quiet_since_ts is not None and score.frame.ts - event.quiet_since_ts >= policy.cooldown_s:
            alert = self._alert(state, "closed")
            state.event = None
            return [alert]
        return []

    @staticmethod
    def _alert(state: _Stream, status: str) -> AlertMsg:
        event, peak = state.event, state.event.peak
        start, end = event.start, event.end
        return AlertMsg(event_id=f"{track(start)}:{start.seq}", status=status, stream=start.stream,
                        start_seq=start.seq, end_seq=end.seq, start_ts=start.ts, end_ts=end.ts,
                        peak_score=peak.image_score, peak_seq=peak.frame.seq,
                        threshold=state.policy.threshold_of(peak), frames=list(event.frames),
                        method=peak.method, class_name=peak.class_name, telemetry=peak.frame.telemetry)


# ---- outputs -------------------------------------------------------------------------------
class OutputError(RuntimeError):
    """An output gave up on an alert (retries exhausted, refused): the runner dead-letters it."""


class AlertOutput(ABC):
    @abstractmethod
    def write(self, alert: AlertMsg) -> bool:
        """Deliver one alert; False when it had been delivered before and was skipped."""

    def flush(self) -> None:
        """Make every written alert durable; called before offsets are committed."""

    def close(self) -> None:
        self.flush()


class JsonlOutput(AlertOutput):
    """One JSON line per alert, appended and flushed (not fsynced). The (event_id, status) pairs
    already in the file are read at start and never written again, so replays and restarts
    do not repeat lines."""

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

    def write(self, alert: AlertMsg) -> bool:
        key = (alert.event_id, alert.status)
        if key in self.written:
            return False
        self.file.write(encode(alert) + b"\n")
        self.written.add(key)
        return True

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class BusOutput(AlertOutput):
    """Publishes each alert to ``topic`` keyed by stream (consumers keep the latest status per
    event_id, so a re-published alert is harmless)."""

    def __init__(self, producer: Producer, topic: str):
        self.producer, self.topic = producer, topic

    def write(self, alert: AlertMsg) -> bool:
        self.producer.send(self.topic, encode(alert), key=alert.stream.encode())
        return True

    def flush(self) -> None:
        self.producer.flush()  # BusError propagates: offsets stay uncommitted, alerts are redone


class WebhookOutput(AlertOutput):
    """POSTs each alert as JSON. Connection errors, timeouts, 5xx and 429 are retried with
    exponential backoff (backoff_s, 2x, 4x, ...); other 4xx are not retried. Receivers should
    de-duplicate on (event_id, status): after a restart an alert may be POSTed again. Once
    ``stop`` is set, retries end early: the alert becomes a dead letter rather than holding
    up shutdown."""

    def __init__(self, url: str, retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 5,
                 headers: dict[str, str] | None = None, stop: threading.Event | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"webhook URL must be http(s)://host[:port]/path, got {url!r}")
        if retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("webhook retries and backoff_s must be >= 0 and timeout_s > 0")
        self.url, self.retries, self.backoff_s, self.timeout_s = url, retries, backoff_s, timeout_s
        self.stop = stop or threading.Event()
        self.headers = {"Content-Type": "application/json", "User-Agent": "linewatch", **(headers or {})}

    def write(self, alert: AlertMsg) -> bool:
        body, last_error = encode(alert), ""
        for attempt in range(self.retries + 1):
            if attempt and self.stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                last_error += " (stopped while retrying)"
                break
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                return True
            except urllib.error.HTTPError as err:
                metrics.WEBHOOK_FAILURES.inc()
                last_error = f"HTTP {err.code} {err.reason}"
                if err.code != 429 and err.code < 500:
                    raise OutputError(f"webhook {self.url} refused alert {alert.event_id} ({alert.status}): "
                                      f"{last_error}") from None
            except OSError as err:  # URLError (refused, DNS), timeouts, resets
                metrics.WEBHOOK_FAILURES.inc()
                last_error = str(getattr(err, "reason", None) or err)
        raise OutputError(f"webhook {self.url}: alert {alert.event_id} ({alert.status}) not delivered after "
                          f"{attempt + 1} attempt(s); last error: {last_error}")
