"""DJI-style SRT telemetry sidecars: the ``.srt`` next to a drone video, one cue per frame
(or per second on older models) with the drone's position.

Variants understood (one cue's text, after the ``00:00:00,000 --> 00:00:00,033`` line):

- newer (Mini / Air / Mavic 3): ``2023-06-01 10:21:33.123`` then
  ``[latitude: 22.5] [longitude: 113.9] [rel_alt: 1.3 abs_alt: 93.5]`` (also ``[latitude : ..]``,
  the ``longtitude`` typo and ``[altitude: ..]``), often wrapped in ``<font>`` tags;
- older (Mavic Pro / Phantom): ``GPS(113.9,22.5,19)`` (longitude first, then altitude) with
  ``BAROMETER:1.9`` or ``H 12.0m`` for the height above take-off.

A cue that yields no time range or no field at all is skipped; a bad sidecar never stops ingest.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..bus.messages import Telemetry

log = logging.getLogger(__name__)

_RANGE = re.compile(r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*-->\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})")
_TAG = re.compile(r"<[^>]*>")
_CLOCK = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}[ T]\d{1,2}:\d{2}:\d{2}(?:[.,:]\d+)*")
_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_FIELD = re.compile(rf"([A-Za-z_]+)\s*:\s*({_NUMBER})")
_GPS = re.compile(rf"GPS\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})(?:\s*,\s*({_NUMBER}))?\s*\)", re.IGNORECASE)
_HEIGHT = re.compile(rf"\bH\s*:?\s*({_NUMBER})\s*m\b")

# SRT key (lower case) -> Telemetry field
_KEYS = {
    "latitude": "latitude", "lat": "latitude",
    "longitude": "longitude", "longtitude": "longitude", "lon": "longitude", "lng": "longitude",
    "abs_alt": "altitude", "altitude": "altitude",
    "rel_alt": "relative_altitude", "barometer": "relative_altitude",
}


@dataclass(frozen=True)
class Cue:
    start: float  # seconds of media time
    end: float
    telemetry: Telemetry


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def parse_cue_text(text: str) -> Telemetry | None:
    """The telemetry in one cue's text, or None when it holds none."""
    text = _TAG.sub(" ", text)
    found: dict[str, float | str] = {}
    clock = _CLOCK.search(text)
    if clock:
        found["time"] = clock.group(0)
    gps = _GPS.search(text)
    if gps:
        found["longitude"], found["latitude"] = float(gps.group(1)), float(gps.group(2))
        if gps.group(3) is not None:
            found["altitude"] = float(gps.group(3))
    height = _HEIGHT.search(text)
    if height:
        found["relative_altitude"] = float(height.group(1))
    for key, value in _FIELD.findall(text):
        field = _KEYS.get(key.lower())
        if field is not None:
            found.setdefault(field, float(value))
    lat, lon = found.get("latitude"), found.get("longitude")
    # DJI writes 0,0 before the GPS fix; out-of-range values are garbage, not positions.
    if (lat == 0 and lon == 0) or (lat is not None and abs(lat) > 90) or (lon is not None and abs(lon) > 180):
        found.pop("latitude", None)
        found.pop("longitude", None)
    return Telemetry(**found) if found else None


def parse_srt(text: str) -> list[Cue]:
    """Every usable cue of an SRT text, in time order."""
    cues, skipped = [], 0
    for block in re.split(r"\n\s*\n", text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")):
        if not block.strip():
            continue
        span = _RANGE.search(block)
        telemetry = parse_cue_text(block[span.end():]) if span else None
        if telemetry is None:
            skipped += 1
            continue
        g = span.groups()
        cues.append(Cue(_seconds(*g[:4]), _seconds(*g[4:]), telemetry))
    if skipped:
        log.warning("SRT: skipped %d cue(s) without a time range or telemetry", skipped)
    return sorted(cues, key=lambda cue: cue.start)


class TelemetryTrack:
    """Cues of one sidecar with lookup by media time."""

    def __init__(self, cues: list[Cue], tolerance_s: float = 0.5):
        self.cues = sorted(cues, key=lambda cue: cue.start)
        self.starts = [cue.start for cue in self.cues]
        self.tolerance_s = tolerance_s  # how far past a cue's end (a gap, the last cue) it still applies

    def __len__(self) -> int:
        return len(self.cues)

    def at(self, pts: float) -> Telemetry | None:
        """Telemetry of the cue covering ``pts`` (the latest cue that started by then)."""
        i = bisect.bisect_right(self.starts, pts) - 1
        if i < 0 or pts > self.cues[i].end + self.tolerance_s:
            return None
        return self.cues[i].telemetry


def find_sidecar(video: Path) -> Path | None:
    """``clip.srt`` or ``clip.SRT`` next to ``clip.mp4``."""
    for suffix in (".srt", ".SRT", ".Srt"):
        candidate = video.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def load_track(path: Path) -> TelemetryTrack | None:
    """The track of an SRT file; None (with a warning) when it is unreadable or holds no cue."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        log.warning("cannot read SRT %s: %s", path, err)
        return None
    cues = parse_srt(text)
    if not cues:
        log.warning("SRT %s holds no telemetry cue; frames go without telemetry", path)
        return None
    return TelemetryTrack(cues)
