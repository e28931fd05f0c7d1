"""Anomaly maps on the wire: a float map <-> ``EncodedMap`` (8-bit PNG at reduced resolution).

The PNG holds the map min-max scaled to [0, 255]; ``lo`` and ``hi`` restore the values:
value = lo + png / 255 * (hi - lo). 8 bits over the map's own range is ample for display and
masks, and a 64 px map is a few hundred bytes instead of megabytes of floats.
"""

from __future__ import annotations

import cv2
import numpy as np

from .messages import EncodedMap

MAP_MAX_SIDE = 64  # long side of a map on the wire


class MapError(ValueError):
    """A map that cannot be encoded, or an ``EncodedMap`` whose PNG does not decode."""


def encode_map(anomaly_map: np.ndarray, max_side: int = MAP_MAX_SIDE) -> EncodedMap:
    """Downscale (area-averaged) so the long side is at most ``max_side``, quantise to 8 bits."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise MapError(f"expected a non-empty 2-D map, got shape {values.shape}")
    if max_side < 1:
        raise MapError(f"max_side must be at least 1, got {max_side}")
    if not np.isfinite(values).all():
        raise MapError("map has NaN or infinite values")
    height, width = values.shape
    scale = max_side / max(height, width)
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
        values = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    pixels = np.zeros(values.shape, np.uint8) if span <= 0 else \
        np.clip(np.rint((values - lo) / span * 255), 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", pixels)
    if not ok:
        raise MapError("cv2 could not encode the map as PNG")
    return EncodedMap(png=png.tobytes(), lo=lo, hi=hi)


def decode_map(encoded: EncodedMap) -> np.ndarray:
    """The float32 [h, w] map back from its PNG (at the reduced resolution it was sent at)."""
    pixels = cv2.imdecode(np.frombuffer(encoded.png, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise MapError(f"map PNG does not decode ({len(encoded.png)} bytes)")
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise MapError(f"map PNG must be 8-bit grey, got shape {pixels.shape} dtype {pixels.dtype}")
    return (encoded.lo + pixels.astype(np.float32) / 255.0 * (encoded.hi - encoded.lo)).astype(np.float32)
