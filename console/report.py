"""``linewatch report RUN_DIR``: a run's result as one self-contained HTML file to share (no
script, no external file: the images are inline, the charts are SVG).

It reads what ``linewatch run --out RUN_DIR --scores RUN_DIR/scores.jsonl`` leaves:
``scores.jsonl`` (per-frame scores: the timelines; optional), ``alerts.jsonl`` (the events,
latest status of each) and ``archive/`` (each event's peak frame overlay and mask, and the
console's reviews when it kept any there). Per stream and session: the score timeline with
the threshold and the anomalous frames shaded, the flight path with the events when the frames
had telemetry, and a card per event.
"""

from __future__ import annotations

import base64
import html
import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from .files import ArchiveFiles
from .store import session_of

THUMB_WIDTH = 480
W, H = 900, 180  # timeline size in px


def _lines(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line torn by a crash
    return out


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _thumb(data: bytes | None) -> str:
    if data is None:
        return ""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return ""
    if image.shape[1] > THUMB_WIDTH:
        image = cv2.resize(image, (THUMB_WIDTH, round(image.shape[0] * THUMB_WIDTH / image.shape[1])),
                           interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(jpeg.tobytes()).decode()}" alt="">' if ok else ""


def _reviews(index: Path) -> dict[str, dict]:
    if not index.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{index}?mode=ro", uri=True) as db:
            return {r[0]: {"verdict": r[1], "note": r[2]} for r in
                    db.execute("SELECT event_id, verdict, note FROM console_reviews")}
    except sqlite3.Error:  # no console ever kept reviews here
        return {}


def timeline_svg(points: list[dict], events: list[dict]) -> str:
    """Scores against capture time: the line, the threshold (dashed), anomalous frames shaded,
    events as bands."""
    if not points:
        return ""
    t0, t1 = points[0]["ts"], max(points[-1]["ts"], points[0]["ts"] + 1e-6)
    top = max(max(p["score"] for p in points), max(p["threshold"] for p in points)) * 1.1 or 1.0

    def x(ts: float) -> float:
        return 40 + (ts - t0) / (t1 - t0) * (W - 50)

    def y(v: float) -> float:
        return H - 20 - v / top * (H - 30)

    step = (W - 50) / max(len(points) - 1, 1)
    shaded = "".join(f'<rect x="{x(p["ts"]) - step / 2:.1f}" y="10" width="{max(step, 1):.1f}" height="{H - 30}" '
                     f'fill="#e53935" opacity="0.18"/>' for p in points if p["anomalous"])
    bands = "".join(f'<rect x="{x(e["start_ts"]):.1f}" y="4" width="{max(x(e["end_ts"]) - x(e["start_ts"]), 2):.1f}" '
                    f'height="5" fill="#b71c1c"><title>{html.escape(e["event_id"])}</title></rect>' for e in events)
    line = " ".join(f"{x(p['ts']):.1f},{y(p['score']):.1f}" for p in points)
    threshold = " ".join(f"{x(p['ts']):.1f},{y(p['threshold']):.1f}" for p in points)
    return (f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="score timeline">'
            f'<rect x="40" y="10" width="{W - 50}" height="{H - 30}" fill="#fafafa" stroke="#ccc"/>{shaded}{bands}'
            f'<polyline points="{threshold}" fill="none" stroke="#e53935" stroke-dasharray="5 4"/>'
            f'<polyline points="{line}" fill="none" stroke="#1565c0" stroke-width="1.5"/>'
            f'<text x="2" y="{y(top / 1.1) + 4:.0f}" font-size="11">{top / 1.1:.2f}</text>'
            f'<text x="2" y="{H - 16}" font-size="11">0</text>'
            f'<text x="40" y="{H - 4}" font-size="11">{html.escape(_when(t0))}</text>'
            f'<text x="{W - 10}" y="{H - 4}" font-size="11" text-anchor="end">+{t1 - t0:.1f} s</text></svg>')


def path_svg(points: list[dict], events: list[dict]) -> str:
    """The flight path (equirectangular, north up) and the events at their peak position."""
    track = [(p["longitude"], p["latitude"]) for p in points if p.get("latitude") is not None]
    marks = [(e["telemetry"]["longitude"], e["telemetry"]["latitude"], e["event_id"]) for e in events
             if (e.get("telemetry") or {}).get("latitude") is not None]
    every = track + [(lon, lat) for lon, lat, _ in marks]
    if len(every) < 2:
        return ""
    lons, lats = [p[0] for p in every], [p[1] for p in every]
    scale = np.cos(np.radians(np.mean(lats)))
    span = max((max(lons) - min(lons)) * scale, max(lats) - min(lats), 1e-6)
    size = 320

    def xy(lon: float, lat: float) -> str:
        return f"{10 + (lon - min(lons)) * scale / span * (size - 20):.1f},{size - 10 - (lat - min(lats)) / span * (size - 20):.1f}"

    dots = "".join(f'<circle cx="{xy(lon, lat).split(",")[0]}" cy="{xy(lon, lat).split(",")[1]}" r="6" fill="#e53935">'
                   f'<title>{html.escape(name)}</title></circle>' for lon, lat, name in marks)
    return (f'<svg viewBox="0 0 {size} {size}" width="{size}" height="{size}" role="img" aria-label="flight path">'
            f'<rect width="{size}" height="{size}" fill="#eef3e8"/>'
            f'<polyline points="{" ".join(xy(*p) for p in track)}" fill="none" stroke="#1565c0" stroke-width="2"/>'
            f'{dots}</svg>')


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder not found: {run}")
    scores, alerts = _lines(run / "scores.jsonl"), _lines(run / "alerts.jsonl")
    if not scores and not alerts:
        raise ValueError(f"{run} holds neither scores.jsonl nor alerts.jsonl: give the folder of a "
                         "`linewatch run --out DIR` (with --scores DIR/scores.jsonl for the timelines)")
    events: dict[str, dict] = {}
    for row in alerts:
        if "event_id" in row and "stream" in row and (row["event_id"] not in events or row.get("status") == "closed"):
            events[row["event_id"]] = row
    archive = ArchiveFiles(str(run / "archive")) if (run / "archive").is_dir() else None
    reviews = _reviews(run / "archive" / "index.sqlite")
    flights: dict[tuple[str, str], dict] = {}
    seen = set()
    for row in scores:
        key = (row["stream"], row.get("session", ""), row["seq"])
        if key not in seen:  # at least once: a repeated line is the same frame
            seen.add(key)
            flights.setdefault(key[:2], {"points": [], "events": []})["points"].append(row)
    for event in events.values():
        event["session"] = session_of_row(event)
        flights.setdefault((event["stream"], event["session"]), {"points": [], "events": []})["events"].append(event)

    sections = []
    for (stream, session), flight in sorted(flights.items(), key=lambda kv: kv[0]):
        points = sorted(flight["points"], key=lambda p: p["seq"])
        flight_events = sorted(flight["events"], key=lambda e: e["start_ts"])
        cards = "".join(_card(event, archive, reviews.get(event["event_id"])) for event in flight_events)
        summary = (f"{len(points)} frames scored, {sum(p['anomalous'] for p in points)} anomalous; "
                   if points else "no per-frame scores (run with --scores RUN_DIR/scores.jsonl); ")
        sections.append(
            f"<section><h2>{html.escape(stream)} <small>session {html.escape(session or '-')}</small></h2>"
            f"<p>{summary}{len(flight_events)} event(s)</p><div class='charts'>{timeline_svg(points, flight_events)}"
            f"{path_svg(points, flight_events)}</div>{cards}</section>")
    target = Path(out) if out is not None else run / "report.html"
    target.write_text(_PAGE.format(title=html.escape(report_title(flights)), folder=html.escape(str(run.resolve())),
                                   made=html.escape(_when(datetime.now(timezone.utc).timestamp())),
                                   body="".join(sections)), encoding="utf-8")
    return target


def report_title(flights: dict[tuple[str, str], dict]) -> str:
    """What the report covers: its streams and the capture time they span."""
    streams = sorted({stream for stream, _ in flights})
    times = [t for flight in flights.values() for t in [*(p["ts"] for p in flight["points"] if "ts" in p),
                                                         *(e[k] for e in flight["events"] for k in ("start_ts", "end_ts"))]]
    named = ", ".join(streams[:3]) + (f" and {len(streams) - 3} more" if len(streams) > 3 else "")
    if not times:
        return f"linewatch report: {named}"
    start, end = _when(min(times)), _when(max(times))
    same_day = start[:10] == end[:10]
    return f"linewatch report: {named}, {start[:-4]} to {end[11:] if same_day else end}"


def _verdict(review: dict | None) -> str:
    """The console's verdict as a person reads it: "confirmed", "false alarm"."""
    if not review:
        return "not reviewed"
    said = (review["verdict"] or "not reviewed").replace("_", " ")
    return f"{said}: {review['note']}" if review["note"] else said


def session_of_row(event: dict) -> str:
    from ..bus.messages import AlertMsg

    try:
        return session_of(AlertMsg.model_validate(event))
    except ValueError:
        return ""


def _card(event: dict, archive: ArchiveFiles | None, review: dict | None) -> str:
    images = ""
    if archive is not None:
        row = archive.row(event["stream"], event["session"], event["peak_seq"])
        if row is not None:
            images = "".join(_thumb((archive.image(row, kind) or (None,))[0]) for kind in ("overlay", "mask"))
    t = event.get("telemetry") or {}
    where = (f"{t['latitude']:.6f}, {t['longitude']:.6f}" + (f", {t['altitude']:.1f} m" if t.get("altitude") is not None
                                                              else "")) if t.get("latitude") is not None else "—"
    verdict = _verdict(review)
    return (f"<article><h3>{html.escape(event['event_id'])} <span class='{event['status']}'>{event['status']}</span>"
            f"</h3><div class='imgs'>{images or '<p>(no archived frame)</p>'}</div><table>"
            f"<tr><th>time</th><td>{_when(event['start_ts'])} → {_when(event['end_ts'])}</td></tr>"
            f"<tr><th>frames</th><td>{event['start_seq']}..{event['end_seq']} ({len(event.get('frames', []))} "
            f"anomalous)</td></tr><tr><th>peak</th><td>{event['peak_score']:.3f} at frame {event['peak_seq']} "
            f"(threshold {event['threshold']:.3f}; {html.escape(event.get('method', ''))}, "
            f"{html.escape(event.get('class_name', ''))})</td></tr><tr><th>position</th><td>{where}</td></tr>"
            f"<tr><th>review</th><td>{html.escape(verdict)}</td></tr></table></article>")


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1280px}}
h1{{font-size:20px}} h2{{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd}} h3{{font-size:15px}}
small{{color:#777;font-weight:normal}} .charts{{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}}
article{{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:12px 0}}
.imgs{{display:flex;gap:8px;flex-wrap:wrap}} .imgs img{{max-width:480px;border-radius:4px}}
table{{border-collapse:collapse}} th{{text-align:left;padding-right:12px;color:#555;font-weight:normal}}
.open{{color:#b71c1c}} .closed{{color:#2e7d32}} svg{{max-width:100%;height:auto}}</style></head>
<body><h1>{title}</h1><p>The run in <code>{folder}</code>, written {made} by <code>linewatch report</code>. Timelines: score (blue) against
capture time, threshold dashed red, anomalous frames shaded, events as dark bars.</p>{body}</body></html>
"""
