"""What the console keeps across restarts, in SQLite beside the archive's own ``frames`` table
(the archive's ``index.sqlite`` for a folder archive): the events it has seen (latest status,
the alert as JSON, the score curve around it), the operators' reviews, and the flights'
tracks (one telemetry point per second of capture time per stream and session).

Every write is an upsert keyed by what names the thing (``event_id``; stream and session;
flight and seq), so reading the alerts topic again from its start after a restart changes
nothing. A closed event is never turned back to open by a late copy of its open alert.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from ..bus.messages import AlertMsg

VERDICTS = ("confirmed", "false_alarm")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS console_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, stream TEXT NOT NULL,
    session TEXT NOT NULL, status TEXT NOT NULL, start_seq INTEGER, end_seq INTEGER, start_ts REAL, end_ts REAL,
    peak_seq INTEGER, peak_score REAL, threshold REAL, method TEXT, class_name TEXT, alert TEXT NOT NULL,
    curve TEXT, updated REAL);
CREATE INDEX IF NOT EXISTS console_events_start ON console_events (start_ts);
CREATE TABLE IF NOT EXISTS console_reviews (
    event_id TEXT PRIMARY KEY, verdict TEXT, note TEXT NOT NULL DEFAULT '', at REAL, feedback TEXT);
CREATE TABLE IF NOT EXISTS console_flights (
    id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL, session TEXT NOT NULL, first_ts REAL, last_ts REAL,
    UNIQUE (stream, session));
CREATE TABLE IF NOT EXISTS console_track (
    flight INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL, latitude REAL, longitude REAL, altitude REAL,
    PRIMARY KEY (flight, seq));
"""

_EVENT_COLUMNS = ("id", "event_id", "stream", "session", "status", "start_seq", "end_seq", "start_ts", "end_ts",
                  "peak_seq", "peak_score", "threshold", "method", "class_name")


def session_of(alert: AlertMsg) -> str:
    """The ingest session of an event: ``event_id`` is ``<stream>@<session>:<start>`` (or
    ``<stream>:<start>`` without one)."""
    head = alert.event_id.rsplit(":", 1)[0]
    prefix = f"{alert.stream}@"
    return head[len(prefix):] if head.startswith(prefix) else ""


class ConsoleStore:
    """One SQLite connection shared under a lock (the readers and the web app use it)."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        # the archive sink writes the same file from another connection: wait for its lock
        self.db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        with self.lock, self.db:
            self.db.executescript(_SCHEMA)

    # ---- events ------------------------------------------------------------------------
    def upsert_event(self, alert: AlertMsg, curve: list | None = None) -> int:
        """Record an alert (the latest status wins, closed over open); returns the event's id."""
        now = time.time()
        values = {"event_id": alert.event_id, "stream": alert.stream, "session": session_of(alert),
                  "status": alert.status, "start_seq": alert.start_seq, "end_seq": alert.end_seq,
                  "start_ts": alert.start_ts, "end_ts": alert.end_ts, "peak_seq": alert.peak_seq,
                  "peak_score": alert.peak_score, "threshold": alert.threshold, "method": alert.method,
                  "class_name": alert.class_name, "alert": alert.model_dump_json(exclude_none=True),
                  "curve": json.dumps(curve) if curve else None, "updated": now}
        with self.lock, self.db:
            found = self.db.execute("SELECT id, status, curve FROM console_events WHERE event_id = ?",
                                    (alert.event_id,)).fetchone()
            if found is None:
                names = ", ".join(values)
                cursor = self.db.execute(f"INSERT INTO console_events ({names}) VALUES ({', '.join('?' * len(values))})",
                                         list(values.values()))
                return cursor.lastrowid
            if found["status"] == "closed" and alert.status == "open":
                return found["id"]  # a late copy of the open alert
            if values["curve"] is None or len(found["curve"] or "") > len(values["curve"]):
                values["curve"] = found["curve"]
            sets = ", ".join(f"{k} = ?" for k in values if k != "event_id")
            self.db.execute(f"UPDATE console_events SET {sets} WHERE id = ?",
                            [v for k, v in values.items() if k != "event_id"] + [found["id"]])
            return found["id"]

    def save_curve(self, event_id: int, curve: list) -> None:
        with self.lock, self.db:
            self.db.execute("UPDATE console_events SET curve = ? WHERE id = ?", (json.dumps(curve), event_id))

    def events(self, stream: str | None = None, status: str | None = None, since: float | None = None,
               until: float | None = None, limit: int = 500) -> list[dict]:
        """Newest first, each with its review."""
        where, args = [], []
        for clause, value in (("e.stream = ?", stream), ("e.status = ?", status), ("e.end_ts >= ?", since),
                              ("e.start_ts < ?", until)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = (f"SELECT {', '.join('e.' + c for c in _EVENT_COLUMNS)}, r.verdict, r.note FROM console_events e "
               f"LEFT JOIN console_reviews r ON r.event_id = e.event_id "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY e.start_ts DESC, e.id DESC LIMIT ?")
        with self.lock:
            return [dict(row) for row in self.db.execute(sql, [*args, limit])]

    def event(self, event_id: int) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM console_events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                return None
            event = dict(row)
            review = self.db.execute("SELECT verdict, note, at, feedback FROM console_reviews WHERE event_id = ?",
                                     (event["event_id"],)).fetchone()
        event["alert"] = json.loads(event["alert"])
        event["curve"] = json.loads(event["curve"]) if event["curve"] else []
        event["review"] = _review(review)
        return event

    def streams(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT DISTINCT stream FROM console_events ORDER BY stream")]

    # ---- reviews -----------------------------------------------------------------------
    def review(self, event_id: str, verdict: str | None, note: str, at: float | None = None) -> dict:
        if verdict is not None and verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)} (or null to clear it)")
        at = time.time() if at is None else at
        with self.lock, self.db:
            self.db.execute("INSERT INTO console_reviews (event_id, verdict, note, at) VALUES (?, ?, ?, ?) "
                            "ON CONFLICT (event_id) DO UPDATE SET verdict = excluded.verdict, note = excluded.note, "
                            "at = excluded.at", (event_id, verdict, note, at))
        return {"event_id": event_id, "verdict": verdict, "note": note, "at": at}

    def record_feedback(self, event_id: str, feedback: dict) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT INTO console_reviews (event_id, feedback) VALUES (?, ?) ON CONFLICT (event_id) "
                            "DO UPDATE SET feedback = excluded.feedback", (event_id, json.dumps(feedback)))

    def reviews(self) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.db.execute("SELECT event_id, verdict, note, at FROM console_reviews")]

    # ---- flights -----------------------------------------------------------------------
    def add_track(self, points: list[tuple[str, str, int, float, float, float, float | None]]) -> None:
        """(stream, session, seq, ts, latitude, longitude, altitude) points."""
        if not points:
            return
        with self.lock, self.db:
            flights: dict[tuple[str, str], int] = {}
            for stream, session, seq, ts, lat, lon, alt in points:
                key = (stream, session)
                if key not in flights:
                    self.db.execute("INSERT INTO console_flights (stream, session, first_ts, last_ts) VALUES "
                                    "(?, ?, ?, ?) ON CONFLICT (stream, session) DO NOTHING", (stream, session, ts, ts))
                    flights[key] = self.db.execute("SELECT id FROM console_flights WHERE stream = ? AND session = ?",
                                                   key).fetchone()[0]
                self.db.execute("UPDATE console_flights SET first_ts = min(first_ts, ?), last_ts = max(last_ts, ?) "
                                "WHERE id = ?", (ts, ts, flights[key]))
                self.db.execute("INSERT OR REPLACE INTO console_track VALUES (?, ?, ?, ?, ?, ?)",
                                (flights[key], seq, ts, lat, lon, alt))

    def flights(self) -> list[dict]:
        with self.lock:
            return [dict(r) for r in self.db.execute(
                "SELECT f.id, f.stream, f.session, f.first_ts, f.last_ts, count(t.seq) AS points FROM console_flights f "
                "LEFT JOIN console_track t ON t.flight = f.id GROUP BY f.id ORDER BY f.first_ts DESC")]

    def flight(self, flight_id: int) -> dict | None:
        with self.lock:
            row = self.db.execute("SELECT * FROM console_flights WHERE id = ?", (flight_id,)).fetchone()
            if row is None:
                return None
            flight = dict(row)
            flight["track"] = [list(r) for r in self.db.execute(
                "SELECT seq, ts, latitude, longitude, altitude FROM console_track WHERE flight = ? ORDER BY seq",
                (flight_id,))]
            ids = [r[0] for r in self.db.execute("SELECT id FROM console_events WHERE stream = ? AND session = ? "
                                                 "ORDER BY start_ts", (flight["stream"], flight["session"]))]
        flight["events"] = [self.event(i) for i in ids]
        return flight

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _review(row) -> dict | None:
    if row is None:
        return None
    review = dict(row)
    review["feedback"] = json.loads(review["feedback"]) if review["feedback"] else None
    return review
