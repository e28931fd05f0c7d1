"""Per-stream alerting: scores in (at-least-once, roughly in order) -> anomalous events out.

Per stream and ingest session, scores pass a de-duplicating reorder buffer and are then
judged in seq order:

- **Debounce (k of n).** An event opens when at least ``k`` of the last ``n`` sequence numbers
  are anomalous. The window counts seq numbers, not arrivals: a frame that never came (it was
  dead-lettered) counts as normal. The event starts at the first anomalous frame of that
  window, so ``event_id = "<stream>@<session>:<start_seq>"`` is the same on every replay.
- **Quiet and close (hysteresis).** An open event goes quiet when ``n`` consecutive seq numbers
  hold no anomalous frame. It closes once it has stayed quiet for ``cooldown_s`` seconds of
  capture time (``frame.ts``), counted from the frame that made it quiet; with the default
  ``cooldown_s=0`` it closes on that very frame.
- **Cool-down merges.** If the k-of-n rule fires again while the event is quiet, the new
  anomalous frames join the same event (no second "open" alert), so a flickering defect makes
  one event rather than a storm. A lone anomalous frame during cool-down does not re-arm it.
- **End of a session.** The session's end marker (``SessionEnd``, sent by ingest when a file
  or folder ends or ingest stops) releases what the buffer holds and closes the open event.
  A session that stops without one (a live source whose ingest died) ends once the stream's
  own capture time moves ``gap_s`` past its last frame: a frame of the stream, of this session
  or a later one, that much younger arrives. Time here is always capture time, never the
  sink's clock, so slow scoring or a slow output cannot split an event.
- **Alerts.** ``status="open"`` when an event opens (the real-time alert) and ``"closed"``
  when it ends; both carry the frames, peak and telemetry known at that point.

De-duplication: a seq at or below the session's release watermark, already buffered, or of
an ended session is ignored (re-scored frames, replays). The buffer releases the next
expected seq at once and, when it holds more than ``reorder_window`` scores, gives up on the
missing seq and releases the lowest buffered one, so a gap never stalls a stream. A score
arriving after its seq was passed over is dropped and counted as late. A session seen first
at seq 0 starts there at once; one first seen mid-way (no state for it) starts at its lowest
seq once the buffer overflows or the session ends, so early reordering there is not taken for
a gap.

State: all the tracker knows of a stream is one ``StreamState`` (pydantic, a few KB of JSON):
per session the watermark, recent gaps, the reorder buffer, the anomalous frames of the
current window, the open event, its last capture time and whether it ended. Of a score only
what judging needs is kept (``Hit``). The alert sink writes the states that changed to its
changelog topic before it commits offsets and loads them back after a restart or a rebalance
(``alert_state``), so events continue exactly where they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..bus.messages import AlertMsg, ScoreMsg, SessionEnd, Telemetry

SKIPPED_KEPT = 64  # recent gaps remembered per session, to tell a late score from a duplicate
FINISHED_SESSIONS_KEPT = 8  # ended (or timed-out) sessions remembered per stream, to ignore their duplicates


class AlertPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float | None = Field(default=None, allow_inf_nan=False)  # None: each score's own threshold
    k: int = Field(default=2, ge=1)  # anomalous frames among the last n that open an event
    n: int = Field(default=3, ge=1)  # window length in frames; n normal frames in a row make it quiet
    cooldown_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # quiet time before "closed"
    reorder_window: int = Field(default=16, ge=0)  # scores held back waiting for a missing seq
    # a hole this long in a stream's capture time ends its session (live sources without an end marker)
    gap_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _k_within_n(self) -> AlertPolicy:
        if self.k > self.n:
            raise ValueError(f"k={self.k} must not exceed n={self.n} (k of the last n frames)")
        return self

    def is_anomalous(self, hit: Hit) -> bool:
        # without a policy threshold the worker's own decision (score >= its threshold) stands
        return hit.anomalous if self.threshold is None else hit.score >= self.threshold

    def threshold_of(self, hit: Hit) -> float:
        return hit.threshold if self.threshold is None else self.threshold


class Hit(BaseModel):
    """What the tracker keeps of one scored frame."""

    model_config = ConfigDict(extra="forbid")
    seq: int
    ts: float
    score: float
    threshold: float
    anomalous: bool
    method: str
    class_name: str
    telemetry: Telemetry | None = None

    @classmethod
    def of(cls, score: ScoreMsg) -> Hit:
        meta = score.frame
        return cls(seq=meta.seq, ts=meta.ts, score=score.image_score, threshold=score.threshold,
                   anomalous=score.anomalous, method=score.method, class_name=score.class_name,
                   telemetry=meta.telemetry)


class OpenEvent(BaseModel):
    """An event's summary: its first, last and peak frames and the anomalous frames' seqs."""

    start: Hit
    end: Hit
    peak: Hit
    frames: list[int] = []  # ascending
    quiet_since_ts: float | None = None  # capture time at which it went quiet; None while active

    @classmethod
    def of(cls, hits: list[Hit]) -> OpenEvent:
        event = cls(start=hits[0], end=hits[0], peak=hits[0])
        for hit in hits:
            event.add(hit)
        return event

    def add(self, hit: Hit) -> None:
        self.frames.append(hit.seq)
        self.end = hit
        if hit.score > self.peak.score:  # the first frame wins a tie
            self.peak = hit


class SessionState(BaseModel):
    watermark: int | None = None  # highest seq released (or passed over)
    buffer: dict[int, Hit] = {}  # scores waiting for a missing seq
    recent: list[Hit] = []  # anomalous frames within the last n seqs
    skipped: list[tuple[int, int]] = []  # recent gaps (first, last seq) that were given up on
    event: OpenEvent | None = None
    last_ts: float | None = None  # capture time of the youngest frame seen
    ended: bool = False

    @property
    def active(self) -> bool:
        return bool(self.buffer) or self.event is not None


class StreamState(BaseModel):
    """Everything the tracker knows of one stream; the unit the sink stores."""

    stream: str
    partition: int = 0  # of the scores topic it is read from (its state lives in the same one)
    sessions: dict[str, SessionState] = {}


class AlertTracker:
    """Turns a stream of ScoreMsg and SessionEnd into open/closed AlertMsg (see the module docstring)."""

    def __init__(self, policy_for: Callable[[str], AlertPolicy]):
        self.policy_for = policy_for
        self.streams: dict[str, StreamState] = {}
        self.policies: dict[str, AlertPolicy] = {}
        self.dirty: set[str] = set()  # streams changed since ``take_dirty``
        self.scores = self.duplicates = self.late = 0

    def push(self, score: ScoreMsg, partition: int = 0) -> list[AlertMsg]:
        meta = score.frame
        if not all(math.isfinite(x) for x in (meta.ts, score.image_score, score.threshold)):
            raise ValueError(f"score of {meta.stream}:{meta.seq} has a non-finite capture time, score or threshold")
        state = self._stream(meta.stream, partition)
        session = state.sessions.get(meta.session)
        if session is not None and self._seen(session, meta.seq):
            return []
        policy = self._policy(meta.stream)
        self.scores += 1
        self.dirty.add(meta.stream)
        alerts = self._end_stale(state, policy, meta.ts, keep=meta.session)
        session = state.sessions.setdefault(meta.session, SessionState())
        session.buffer[meta.seq] = Hit.of(score)
        session.last_ts = meta.ts if session.last_ts is None else max(session.last_ts, meta.ts)
        return alerts + self._release(state.stream, meta.session, session, policy, force=False)

    def end(self, marker: SessionEnd, partition: int = 0) -> list[AlertMsg]:
        """The session's end: release its buffer and close its event."""
        state = self._stream(marker.stream, partition)
        session = state.sessions.setdefault(marker.session, SessionState())
        if session.ended:
            self.duplicates += 1
            return []
        self.dirty.add(marker.stream)
        alerts = self._finish(state.stream, marker.session, session, self._policy(marker.stream))
        session.ended = True
        session.last_ts = marker.ts if session.last_ts is None else max(session.last_ts, marker.ts)
        self._prune(state, self._policy(marker.stream), keep=None)
        return alerts

    # ---- state in and out ------------------------------------------------------------------
    def take_dirty(self) -> list[StreamState]:
        """The states changed since the last call."""
        dirty, self.dirty = self.dirty, set()
        return [self.streams[name] for name in sorted(dirty) if name in self.streams]

    def load(self, state: StreamState) -> None:
        self.streams[state.stream] = state

    def drop(self, partitions: set[int]) -> None:
        """Forget the streams of these partitions (another sink owns them now)."""
        for name in [n for n, s in self.streams.items() if s.partition in partitions]:
            del self.streams[name]
            self.dirty.discard(name)

    # ---- internals ------------------------------------------------------------------------
    def _stream(self, name: str, partition: int) -> StreamState:
        state = self.streams.get(name)
        if state is None:
            state = self.streams[name] = StreamState(stream=name, partition=partition)
        state.partition = partition
        return state

    def _policy(self, stream: str) -> AlertPolicy:
        if stream not in self.policies:
            self.policies[stream] = self.policy_for(stream)
        return self.policies[stream]

    def _seen(self, session: SessionState, seq: int) -> bool:
        """A duplicate, or a score whose seq was given up on; counts it."""
        if session.watermark is not None and seq <= session.watermark and any(a <= seq <= b for a, b in session.skipped):
            self.late += 1
            return True
        if session.ended or seq in session.buffer or (session.watermark is not None and seq <= session.watermark):
            self.duplicates += 1
            return True
        return False

    def _end_stale(self, state: StreamState, policy: AlertPolicy, ts: float, keep: str) -> list[AlertMsg]:
        """Finish the sessions whose capture time stopped ``gap_s`` or more before ``ts``."""
        alerts: list[AlertMsg] = []
        for name, session in state.sessions.items():
            if session.active and session.last_ts is not None and ts - session.last_ts >= policy.gap_s:
                alerts += self._finish(state.stream, name, session, policy)
        self._prune(state, policy, keep)
        return alerts

    def _finish(self, stream: str, name: str, session: SessionState, policy: AlertPolicy) -> list[AlertMsg]:
        alerts = self._release(stream, name, session, policy, force=True)
        if session.event is not None:
            alerts.append(self._alert(stream, name, session, "closed", policy))
            session.event = None
        session.recent.clear()  # a session that resumes after a gap starts a fresh window
        return alerts

    @staticmethod
    def _prune(state: StreamState, policy: AlertPolicy, keep: str | None) -> None:
        """Keep the newest FINISHED_SESSIONS_KEPT of the sessions that ended or went stale
        (and ``keep``, the session being added to)."""
        newest = max((s.last_ts for s in state.sessions.values() if s.last_ts is not None), default=None)
        finished = [name for name, s in state.sessions.items() if name != keep and (s.ended or (
            not s.active and s.last_ts is not None and newest - s.last_ts >= policy.gap_s))]
        finished.sort(key=lambda name: state.sessions[name].last_ts or 0.0)
        for name in finished[:-FINISHED_SESSIONS_KEPT]:
            del state.sessions[name]

    def _release(self, stream: str, name: str, session: SessionState, policy: AlertPolicy,
                 force: bool) -> list[AlertMsg]:
        alerts: list[AlertMsg] = []
        while session.buffer:
            lowest = min(session.buffer)
            # a new session starts at seq 0; one joined mid-way (no state for it) waits for the window
            expected = lowest == (0 if session.watermark is None else session.watermark + 1)
            if not (expected or force or len(session.buffer) > policy.reorder_window):
                break
            if not expected and session.watermark is not None:
                session.skipped = [*session.skipped, (session.watermark + 1, lowest - 1)][-SKIPPED_KEPT:]
            alerts += self._judge(stream, name, session, policy, session.buffer.pop(lowest))
            session.watermark = lowest
        return alerts

    def _judge(self, stream: str, name: str, session: SessionState, policy: AlertPolicy, hit: Hit) -> list[AlertMsg]:
        seq = hit.seq
        while session.recent and session.recent[0].seq <= seq - policy.n:
            session.recent.pop(0)
        anomalous = policy.is_anomalous(hit)
        if anomalous:
            session.recent.append(hit)
        event = session.event
        if event is None:
            if len(session.recent) >= policy.k:
                session.event = OpenEvent.of(list(session.recent))
                return [self._alert(stream, name, session, "open", policy)]
            return []
        if event.quiet_since_ts is None:
            if anomalous:
                event.add(hit)
            elif seq - event.end.seq >= policy.n:
                event.quiet_since_ts = hit.ts
        elif len(session.recent) >= policy.k:  # fired again during cool-down: merge, stay open
            for recent in [h for h in session.recent if h.seq > event.end.seq]:
                event.add(recent)
            event.quiet_since_ts = None
        if event.quiet_since_ts is not None and hit.ts - event.quiet_since_ts >= policy.cooldown_s:
            alert = self._alert(stream, name, session, "closed", policy)
            session.event = None
            return [alert]
        return []

    @staticmethod
    def _alert(stream: str, session_id: str, session: SessionState, status: str, policy: AlertPolicy) -> AlertMsg:
        event = session.event
        start, end, peak = event.start, event.end, event.peak
        track = f"{stream}@{session_id}" if session_id else stream
        return AlertMsg(event_id=f"{track}:{start.seq}", status=status, stream=stream,
                        start_seq=start.seq, end_seq=end.seq, start_ts=start.ts, end_ts=end.ts,
                        peak_score=peak.score, peak_seq=peak.seq, threshold=policy.threshold_of(peak),
                        frames=list(event.frames), method=peak.method, class_name=peak.class_name,
                        telemetry=peak.telemetry)
