"""Per-frame scores as JSON lines (``linewatch run --scores FILE``): every frame's score is
visible without the console, and ``linewatch report`` draws the timelines from it.

One line per scored frame, in the order the scores topic gives them::

    {"stream": "drone-1", "session": "...", "seq": 17, "time": "2024-05-14T10:21:34.700Z",
     "ts": 1715682094.7, "score": 0.41, "threshold": 0.38, "anomalous": true,
     "method": "aprilgan", "latitude": 22.5, "longitude": 113.9}

(``latitude``/``longitude`` only with telemetry). The loop reads the scores topic in its own
consumer group and commits after each write (at least once: a crash may repeat lines, which
``(stream, session, seq)`` tells apart).
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path

from ..bus import Bus
from ..bus.messages import MessageError, ScoreMsg, decode
from ..ops.health import HEALTH


def score_line(score: ScoreMsg) -> dict:
    meta = score.frame
    row = {"stream": meta.stream, "session": meta.session, "seq": meta.seq,
           "time": datetime.fromtimestamp(meta.ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
           "ts": meta.ts, "score": score.image_score, "threshold": score.threshold, "anomalous": score.anomalous,
           "method": score.method}
    t = meta.telemetry
    if t is not None and t.latitude is not None and t.longitude is not None:
        row.update(latitude=t.latitude, longitude=t.longitude)
    return row


def run_scores_file(bus: Bus, path: str | Path, *, stop: threading.Event, poll_s: float = 0.5) -> int:
    """Scores -> JSON lines in ``path`` (appended), until ``stop``; returns the lines written.
    Session ends and records of other kinds are skipped (the alert sink dead-letters those)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    consumer = bus.consumer([bus.topics.scores], bus.topics.group("scores"))
    try:
        with path.open("a", encoding="utf-8") as out:
            while not stop.is_set():
                records = consumer.poll(poll_s, 256)
                HEALTH.beat("scores-file")
                for record in records:
                    try:
                        score = decode(record.value, ScoreMsg)
                    except MessageError:
                        continue
                    out.write(json.dumps(score_line(score)) + "\n")
                    written += 1
                if records:
                    out.flush()
                    consumer.commit(records)
    finally:
        HEALTH.stop_beating("scores-file")
        consumer.close()
    return written
