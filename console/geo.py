"""A flight's alerts for GIS tools and Google Earth: GeoJSON (RFC 7946: longitude first) and
KML 2.2, each with the flight's path as a line and one point per event at its peak frame."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from xml.sax.saxutils import escape


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def _position(event: dict) -> tuple[float, float, float | None] | None:
    t = event["alert"].get("telemetry") or {}
    if t.get("latitude") is None or t.get("longitude") is None:
        return None
    return t["longitude"], t["latitude"], t.get("altitude")


def _properties(event: dict) -> dict:
    review = event.get("review") or {}
    return {"event_id": event["event_id"], "stream": event["stream"], "status": event["status"],
            "start": _iso(event["start_ts"]), "end": _iso(event["end_ts"]), "peak_score": event["peak_score"],
            "threshold": event["threshold"], "peak_seq": event["peak_seq"], "method": event["method"],
            "class_name": event["class_name"], "review": review.get("verdict"), "note": review.get("note") or ""}


def flight_geojson(flight: dict) -> dict:
    features = []
    path = [[lon, lat] + ([alt] if alt is not None else []) for _, _, lat, lon, alt in flight["track"]]
    if len(path) >= 2:
        features.append({"type": "Feature", "geometry": {"type": "LineString", "coordinates": path},
                         "properties": {"kind": "flight", "stream": flight["stream"], "session": flight["session"],
                                        "start": _iso(flight["first_ts"]), "end": _iso(flight["last_ts"])}})
    for event in flight["events"]:
        position = _position(event)
        if position is not None:
            coordinates = [position[0], position[1]] + ([position[2]] if position[2] is not None else [])
            features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": coordinates},
                             "properties": {"kind": "alert", **_properties(event)}})
    return {"type": "FeatureCollection", "features": features}


def flight_kml(flight: dict) -> str:
    name = escape(f"linewatch {flight['stream']} {flight['session']}".strip())
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', '<kml xmlns="http://www.opengis.net/kml/2.2"><Document>',
             f"<name>{name}</name>"]
    path = " ".join(f"{lon:.7f},{lat:.7f},{alt or 0:.1f}" for _, _, lat, lon, alt in flight["track"])
    if path:
        parts.append(f"<Placemark><name>flight path</name><LineString><tessellate>1</tessellate>"
                     f"<coordinates>{path}</coordinates></LineString></Placemark>")
    for event in flight["events"]:
        position = _position(event)
        if position is None:
            continue
        props = _properties(event)
        data = "".join(f'<Data name="{escape(k)}"><value>{escape(str(v if v is not None else ""))}</value></Data>'
                       for k, v in props.items())
        parts.append(f"<Placemark><name>{escape(event['event_id'])}</name>"
                     f"<description>{escape(json.dumps(props))}</description>"
                     f"<TimeStamp><when>{_iso(event['start_ts'])}</when></TimeStamp>"
                     f"<ExtendedData>{data}</ExtendedData>"
                     f"<Point><coordinates>{position[0]:.7f},{position[1]:.7f},{position[2] or 0:.1f}</coordinates>"
                     f"</Point></Placemark>")
    parts.append("</Document></kml>")
    return "\n".join(parts)
