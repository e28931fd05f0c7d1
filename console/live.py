"""The live view: per stream, its recent scores (the timeline), the latest scored frame and
map (its overlay), frames/s and lag, or when its session ended; fed by the bus readers, read
by the web app.

Lag is ``bus.records_behind``, as the worker's metric and summary line count it: the frames
topic's end (per partition, as the frames reader last saw it) minus the offset after the
newest scored frame of the stream (the scores carry their frame's offset). It counts from
what is scored, so a batch in flight counts here and not in the worker's metric.

Each timeline point gets a number from one counter (``n``), so a browser asks for "what came
after n" and gets only that. Frames come from the frames topic and maps from the scores topic;
a tile shows the newest frame for which both are here. Everything is bounded: points by
``history_s`` of capture time, frames and maps by the last ``KEPT`` per stream.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..bus import records_behind
from ..bus.maps import MapError, decode_map
from ..bus.messages import EncodedMap, FrameMeta, ScoreMsg, SessionEnd
from ..ops.startup import STARTUP

KEPT = 32  # frames and maps kept per stream, to pair a frame with its score
FPS_WINDOW_S = 5.0
TILE_WIDTH = 480  # px: tiles are small
TRACK_STEP_S = 1.0  # one flight-track point per second of capture time


@dataclass
class StreamView:
    index: int  # the stream's id in URLs: never the stream id itself
    name: str
    points: deque = field(default_factory=deque)  # [n, seq, ts, score, threshold, anomalous]
    latest: dict | None = None
    arrivals: deque = field(default_factory=lambda: deque(maxlen=512))  # wall times of scores
    frames: OrderedDict = field(default_factory=OrderedDict)  # (session, seq) -> JPEG
    maps: OrderedDict = field(default_factory=OrderedDict)  # (session, seq) -> EncodedMap
    position: tuple | None = None  # (frames topic, partition, offset after the newest scored frame)
    ended: dict | None = None  # {"at": wall time, "reason"} once the latest session has ended
    track_ts: dict = field(default_factory=dict)  # session -> capture time of its last track point
    overlay: tuple | None = None  # ((session, seq), JPEG) of the last tile drawn
    newest_ts: float = float("-inf")


def _remember(store: OrderedDict, key, value) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > KEPT:
        store.popitem(last=False)


class LiveState:
    def __init__(self, history_s: float = 600.0, clock=time.time):
        self.history_s, self.clock = history_s, clock
        self.lock = threading.Lock()
        self.streams: dict[str, StreamView] = {}
        self.by_index: list[StreamView] = []
        self.n = 0  # last point number given
        self.alerts_version = 0  # bumped when an alert arrives: browsers reload the list
        self.frames_end: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset after its last record
        # What the process is doing before it scores (None: nothing to say), e.g. start-up's
        # {"stage": "calibrating", "step": 3, "steps": 4, "text": "starting: calibrating (3/4)"};
        # the process's start-up (ops.startup) unless whoever opens the console says otherwise.
        self.stage: Callable[[], dict | None] = STARTUP.state

    def _stream(self, name: str) -> StreamView:
        view = self.streams.get(name)
        if view is None:
            view = self.streams[name] = StreamView(len(self.by_index), name)
            self.by_index.append(view)
        return view

    # ---- fed by the readers -------------------------------------------------------------
    def add_score(self, score: ScoreMsg) -> tuple | None:
        """Record one score; returns a flight-track point when this frame adds one."""
        meta = score.frame
        with self.lock:
            view = self._stream(meta.stream)
            self.n += 1
            view.points.append([self.n, meta.seq, meta.ts, score.image_score, score.threshold, int(score.anomalous)])
            view.newest_ts = max(view.newest_ts, meta.ts)
            while view.points and view.points[0][2] < view.newest_ts - self.history_s:
                view.points.popleft()
            now = self.clock()
            view.arrivals.append(now)
            if view.latest is None or view.latest["session"] != meta.session:
                view.ended = None  # a new session of the stream
            view.latest = {"seq": meta.seq, "session": meta.session, "ts": meta.ts, "score": score.image_score,
                           "threshold": score.threshold, "anomalous": score.anomalous, "method": score.method,
                           "class_name": score.class_name, "latency_s": max(0.0, score.scored_at - meta.sent_at)}
            if score.frame_ref is not None:
                ref = score.frame_ref
                view.position = ((ref.topic, ref.partition), ref.offset + 1)
            _remember(view.maps, (meta.session, meta.seq), score.map)
            if score.frame_jpeg is not None:
                _remember(view.frames, (meta.session, meta.seq), score.frame_jpeg)
            return self._track_point(view, meta)

    def _track_point(self, view: StreamView, meta: FrameMeta) -> tuple | None:
        t = meta.telemetry
        if t is None or t.latitude is None or t.longitude is None:
            return None
        last = view.track_ts.get(meta.session)
        if last is not None and abs(meta.ts - last) < TRACK_STEP_S:
            return None
        view.track_ts[meta.session] = meta.ts
        return (meta.stream, meta.session, meta.seq, meta.ts, t.latitude, t.longitude, t.altitude)

    def end_session(self, end: SessionEnd, at: float | None = None) -> None:
        """The stream's session ended (the worker forwards ingest's end after the session's last
        score); ``at``: when (the record's time), else now."""
        with self.lock:
            view = self.streams.get(end.stream)
            if view is not None and view.latest is not None and view.latest["session"] == end.session:
                view.ended = {"at": at if at else self.clock(), "reason": end.reason}

    def frames_at(self, topic: str, partition: int, end: int) -> None:
        """The frames ``topic``'s ``partition`` reaches ``end`` (the offset after its last record)."""
        with self.lock:
            self.frames_end[(topic, partition)] = max(end, self.frames_end.get((topic, partition), 0))

    def add_frame(self, meta: FrameMeta, jpeg: bytes) -> None:
        with self.lock:
            _remember(self._stream(meta.stream).frames, (meta.session, meta.seq), jpeg)

    def alert_arrived(self) -> None:
        with self.lock:
            self.alerts_version += 1

    # ---- read by the app ----------------------------------------------------------------
    def update(self, after: int) -> dict:
        """Every stream's tile, with the timeline points numbered above ``after``."""
        now, stage = self.clock(), self.stage()
        with self.lock:
            streams = []
            for view in self.by_index:
                recent = sum(1 for t in view.arrivals if t >= now - FPS_WINDOW_S)
                points = []
                for point in reversed(view.points):
                    if point[0] <= after:
                        break
                    points.append(point)
                tile = self._tile_key(view)
                end = self.frames_end.get(view.position[0]) if view.position else None
                streams.append({"id": view.index, "name": view.name, "latest": view.latest,
                                "fps": recent / FPS_WINDOW_S, "points": points[::-1],
                                "lag": None if end is None else records_behind(end, view.position[1]),
                                "ended": view.ended, "tile": f"{tile[0]}:{tile[1]}" if tile else None})
            return {"n": self.n, "alerts_version": self.alerts_version, "history_s": self.history_s,
                    "streams": streams, "stage": stage}

    def curve(self, stream: str, session: str, first: int, last: int) -> list:
        """[seq, ts, score, threshold, anomalous] of the stream's timeline within seq first..last."""
        with self.lock:
            view = self.streams.get(stream)
            if view is None or (view.latest or {}).get("session") != session:
                return []
            return [p[1:] for p in view.points if first <= p[1] <= last]

    @staticmethod
    def _tile_key(view: StreamView):
        both = [key for key in view.maps if key in view.frames]
        return both[-1] if both else None

    def tile(self, index: int) -> bytes | None:
        """The overlay of the stream's newest frame that has its map, as a small JPEG."""
        with self.lock:
            if not 0 <= index < len(self.by_index):
                return None
            view = self.by_index[index]
            key = self._tile_key(view)
            if key is None:
                return None
            if view.overlay is not None and view.overlay[0] == key:
                return view.overlay[1]
            jpeg, encoded = view.frames[key], view.maps[key]
        image = draw_overlay(jpeg, encoded)
        with self.lock:
            view.overlay = (key, image)
        return image


def draw_overlay(jpeg: bytes, encoded: EncodedMap, width: int = TILE_WIDTH) -> bytes | None:
    """The map's JET colouring over its own range, blended over the frame (as the archive draws
    overlays), at most ``width`` px wide."""
    frame = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if frame is None:
        return None
    if frame.shape[1] > width:
        frame = cv2.resize(frame, (width, round(frame.shape[0] * width / frame.shape[1])), interpolation=cv2.INTER_AREA)
    try:
        small = decode_map(encoded)
    except MapError:
        return None
    span = encoded.hi - encoded.lo
    heat = np.zeros(small.shape, np.uint8) if span <= 0 else \
        np.clip(np.rint((small - encoded.lo) / span * 255), 0, 255).astype(np.uint8)
    heat = cv2.resize(heat, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR)
    blended = cv2.addWeighted(frame, 0.55, cv2.applyColorMap(heat, cv2.COLORMAP_JET), 0.45, 0)
    ok, data = cv2.imencode(".jpg", blended, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return data.tobytes() if ok else None
