"""The console's web app (FastAPI): one static page, a JSON API and one server-sent-events
stream (``/api/live``: every half second, each stream's tile and its new timeline points).

Archive files are served by id only: an event by the number the console's store gave it, a
frame by a sequence number that must be one of that event's frames, a kind from a fixed list;
the index row then names the file. Nothing in a request becomes a path.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ..bus import BusError
from .compare import compare, compare_offer
from .feedback import FeedbackError, add_frames
from .files import KINDS
from .geo import flight_geojson, flight_kml
from .guard import Guard

LIVE_PERIOD_S = 0.5


class ReviewIn(BaseModel):
    verdict: str | None = Field(default=None, pattern="^(confirmed|false_alarm)$")
    note: str = Field(default="", max_length=4000)


class FeedbackIn(BaseModel):
    target: str = Field(pattern="^(references|calibration)$")


def build_app(console) -> FastAPI:
    """``console``: a ``service.Console`` (store, live view, archive files, settings)."""
    app = FastAPI(title="linewatch console", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, token=console.token, loopback=console.loopback)
    static = resources.files("linewatch.console") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def event_or_404(event_id: int) -> dict:
        event = console.store.event(event_id)
        if event is None:
            raise HTTPException(404, "no such event")
        return event

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(str(static / "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for it whatever the page links
        return FileResponse(str(static / "favicon.ico"), media_type="image/x-icon",
                            headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/config")
    def config():
        c = console.settings.console
        return {"tile_url": c.tile_url if c.tile_url and c.tile_url.lower() != "none" else "",
                "tile_attribution": c.tile_attribution, "history_s": c.history_s, "live": console.bus is not None,
                "archive": console.settings.archive, "streams": console.store.streams(),
                "topics": {"scores": console.bus.topics.scores} if console.bus is not None else {}}

    @app.get("/api/live")
    async def live(request: Request, after: int = 0):
        # a browser reconnecting sends the id of the last update it had: only what came after
        last = request.headers.get("last-event-id", "")
        cursor = max(after, int(last)) if last.isdigit() else after

        async def stream():
            nonlocal cursor
            yield "retry: 2000\n\n"
            while not console.stop.is_set() and not await request.is_disconnected():
                update = console.live.update(cursor)
                cursor = update["n"]
                yield f"id: {cursor}\ndata: {json.dumps(update)}\n\n"
                await asyncio.sleep(LIVE_PERIOD_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/api/streams/{index}/tile.jpg")
    def tile(index: int):
        image = console.live.tile(index)
        if image is None:
            raise HTTPException(404, "no scored frame of this stream yet")
        return Response(image, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/api/events")
    def events(stream: str | None = None, status: str | None = None, since: float | None = None,
               until: float | None = None, limit: int = 500):
        if status not in (None, "open", "closed"):
            raise HTTPException(422, "status is open or closed")
        return console.store.events(stream, status, since, until, max(1, min(limit, 5000)))

    @app.get("/api/events/{event_id}")
    def event(event_id: int):
        event = event_or_404(event_id)
        live_curve = console.live.curve(event["stream"], event["session"], event["start_seq"] - 10,
                                        event["end_seq"] + 10)
        if len(live_curve) > len(event["curve"]):
            console.store.save_curve(event_id, live_curve)
            event["curve"] = live_curve
        row = console.files.row(event["stream"], event["session"], event["peak_seq"]) if console.files else None
        profile = console.profiles.for_stream(event["stream"])
        event["peak"] = {"archived": row is not None, "telemetry": (row or {}).get("telemetry"),
                         "images": {kind: f"/api/events/{event_id}/frames/{event['peak_seq']}/{kind}" for kind in KINDS}}
        event["feedback_targets"] = {"references": profile.references, "calibration": profile.calibration}
        return event

    @app.get("/api/events/{event_id}/frames/{seq}/{kind}")
    def frame_image(event_id: int, seq: int, kind: str):
        event = event_or_404(event_id)
        if kind not in KINDS or (seq not in event["alert"]["frames"] and seq != event["peak_seq"]) \
                or console.files is None:
            raise HTTPException(404, "no such image")
        row = console.files.row(event["stream"], event["session"], seq)
        image = console.files.image(row, kind) if row is not None else None
        if image is None:
            raise HTTPException(404, "not in the archive")
        return Response(image[0], media_type=image[1], headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/events/{event_id}/review")
    def review(event_id: int, body: ReviewIn):
        event = event_or_404(event_id)
        saved = console.store.review(event["event_id"], body.verdict, body.note)
        if console.files is not None:
            console.files.keep_review(saved)
        console.live.alert_arrived()
        return saved

    @app.post("/api/events/{event_id}/feedback")
    def feedback(event_id: int, body: FeedbackIn):
        event = event_or_404(event_id)
        if console.files is None:
            raise HTTPException(409, "the console has no archive (--archive)")
        try:
            result = add_frames(event, body.target, console.profiles.for_stream(event["stream"]), console.files,
                                console.settings.console.feedback_frames)
        except FeedbackError as err:
            raise HTTPException(409, str(err)) from None
        except OSError as err:
            raise HTTPException(409, f"cannot write there: {err.strerror or err}") from None
        console.store.record_feedback(event["event_id"], {**result, "at": time.time()})
        return result

    @app.get("/api/flights")
    def flights():
        return console.store.flights()

    def flight_or_404(flight_id: int) -> dict:
        flight = console.store.flight(flight_id)
        if flight is None:
            raise HTTPException(404, "no such flight")
        return flight

    @app.get("/api/flights/{flight_id}")
    def flight(flight_id: int):
        return flight_or_404(flight_id)

    @app.get("/api/flights/{flight_id}/alerts.geojson")
    def flight_geo(flight_id: int):
        return JSONResponse(flight_geojson(flight_or_404(flight_id)), media_type="application/geo+json",
                            headers={"Content-Disposition": f'attachment; filename="flight-{flight_id}.geojson"'})

    @app.get("/api/flights/{flight_id}/alerts.kml")
    def flight_kml_file(flight_id: int):
        return Response(flight_kml(flight_or_404(flight_id)), media_type="application/vnd.google-earth.kml+xml",
                        headers={"Content-Disposition": f'attachment; filename="flight-{flight_id}.kml"'})

    @app.get("/api/topics")
    def topics():
        try:
            return compare_offer(console.bus, console.settings.bootstrap_servers)
        except BusError as err:
            raise HTTPException(503, str(err)) from None

    @app.get("/api/compare")
    def compare_topics(a: str, b: str):
        if console.bus is None:
            raise HTTPException(409, "the console reads no bus (give --bootstrap-servers)")
        try:
            return compare(console.bus, a, b, console.policy_for)
        except BusError as err:
            raise HTTPException(404, str(err)) from None

    return app
