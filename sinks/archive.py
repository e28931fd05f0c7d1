"""The anomaly archive: for every anomalous frame, its images and one index row.

Only scores that carry ``frame_jpeg`` are archived — the worker attaches the frame to
anomalous frames only, and the archive is an index of anomalies, not of all footage. Per
frame, under ``<root>/<stream dir>/<session dir>/`` (no session dir for frames without one):

- ``<seq>.frame.jpg``   the frame as scored (the worker's JPEG, byte for byte);
- ``<seq>.mask.png``    the anomaly map resized to the frame, 8-bit grey. By default a heat
  mask scaled over the map's own range (value = map_lo + px / 255 * (map_hi - map_lo), with
  map_lo/map_hi in the index row); with ``binarize=True`` a 0/255 mask of map >= threshold;
- ``<seq>.overlay.jpg`` the map's JET colouring (over its own range) blended over the frame;
- ``<seq>.json``        the index row.

Index: for a local folder, ``<root>/index.sqlite`` (table ``frames``, primary key
(stream, session, seq)). On S3 the per-frame JSON objects are the index (list a stream's prefix); a
local SQLite copy is kept as well when ``index_path`` is given. Everything is idempotent: the
same frame always gets the same names, files are replaced whole, rows are upserted.

The stream directory is the stream id made into one safe path component (``safe_component``),
so no stream id can reach outside the root.

A frame above the pixel budget (``max_pixels``, read from its JPEG header) is refused with an
ArchiveError before it is decoded, and the heat mask is scaled up as 8 bits, not as floats:
a frame costs about 5 bytes per pixel at the peak. Storage failures (S3 or the disk down,
SQLite locked) raise ``StoreUnavailable``: the sink waits them out, the record is not at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from ..bus.jpeg import DEFAULT_MAX_PIXELS, FrameTooLarge, check_pixels
from ..bus.maps import MapError, decode_map
from ..bus.messages import ScoreMsg
from ..bus.redact import register_secret

OVERLAY_ALPHA = 0.45  # share of the heat colouring in the overlay


class ArchiveError(ValueError):
    """A score that cannot be archived (its frame JPEG or map does not decode)."""


class StoreUnavailable(RuntimeError):
    """The store (S3, the disk, the SQLite index) failed: an outage, not the score's fault."""


def safe_component(stream: str) -> str:
    """A stream id as one path component: [A-Za-z0-9._-] only, never '', '.' or '..', no leading
    dot. An id that had to change gets a short hash of the original, so that distinct ids
    ('a/b', 'a_b') never share a directory."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", stream)
    if stream and cleaned == stream and not stream.startswith("."):
        return stream
    digest = hashlib.sha256(stream.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned.lstrip('.')[:80] or 'stream'}-{digest}"


class _LocalStore:
    name = "the archive folder"

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        except OSError as err:  # disk full, read-only, gone
            raise StoreUnavailable(f"cannot write {target}: {err}") from None
        try:  # whole file or nothing: a reader never sees half an image
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise StoreUnavailable(f"cannot write {target}: {err}") from None
            raise

    def url(self, key: str) -> str:
        return str(self.root / key)


class _S3Store:
    def __init__(self, url: str, endpoint_url: str | None, access_key_id: str | None,
                 secret_access_key: str | None, region: str | None):
        import boto3
        from botocore.config import Config

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"archive URL {url!r}: expected s3://bucket[/prefix]")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.name = f"S3 bucket {bucket}"
        for secret in (secret_access_key, os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")):
            register_secret(secret)  # masked in any error botocore gives
        # unset options fall back to the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...).
        # One short attempt per call: the sink retries an outage itself, and answers a stop meanwhile.
        self.client = boto3.client("s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
                                   aws_secret_access_key=secret_access_key, region_name=region,
                                   config=Config(connect_timeout=2, read_timeout=5,
                                                 retries={"total_max_attempts": 1}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)
        except (BotoCoreError, ClientError) as err:  # down, refusing, or misconfigured: wait and say so
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from None

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


_COLUMNS = ("stream", "session", "seq", "ts", "pts", "score", "threshold", "method", "class_name", "anchor_key", "model",
            "telemetry", "frame_path", "mask_path", "overlay_path", "mask_kind", "map_lo", "map_hi", "archived_at")


class _Index:
    """The SQLite index; one connection shared under a lock (the sink may run in any thread)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("""CREATE TABLE IF NOT EXISTS frames (
            stream TEXT NOT NULL, session TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL, pts REAL, score REAL, threshold REAL,
            method TEXT, class_name TEXT, anchor_key TEXT, model TEXT, telemetry TEXT,
            frame_path TEXT, mask_path TEXT, overlay_path TEXT, mask_kind TEXT, map_lo REAL, map_hi REAL,
            archived_at REAL, PRIMARY KEY (stream, session, seq))""")
        self.db.execute("CREATE INDEX IF NOT EXISTS frames_ts ON frames (ts)")
        self.db.commit()

    def upsert(self, row: dict) -> None:
        values = [json.dumps(row[c]) if c == "telemetry" and row[c] is not None else row[c] for c in _COLUMNS]
        try:
            with self.lock, self.db:
                self.db.execute(f"INSERT OR REPLACE INTO frames ({', '.join(_COLUMNS)}) "
                                f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        except sqlite3.OperationalError as err:  # locked, disk full, I/O error
            raise StoreUnavailable(f"SQLite index: {err}") from None

    def get(self, stream: str, seq: int, session: str = "") -> dict | None:
        with self.lock:
            found = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM frames WHERE stream = ? AND session = ? "
                                    "AND seq = ?", (stream, session, seq)).fetchone()
        if found is None:
            return None
        row = dict(zip(_COLUMNS, found))
        row["telemetry"] = json.loads(row["telemetry"]) if row["telemetry"] else None
        return row

    def close(self) -> None:
        with self.lock:
            self.db.close()


class Archive:
    """``root``: a folder (default) or ``s3://bucket/prefix`` (endpoint and credentials from the
    arguments, else the standard AWS environment and config)."""

    def __init__(self, root: str | Path, *, binarize: bool = False, jpeg_quality: int = 90,
                 index_path: str | Path | None = None, endpoint_url: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 region: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
        self.binarize, self.jpeg_quality, self.max_pixels = binarize, jpeg_quality, max_pixels
        if str(root).startswith("s3://"):
            self.store = _S3Store(str(root), endpoint_url, access_key_id, secret_access_key, region)
            self.index = _Index(Path(index_path)) if index_path is not None else None
        else:
            self.store = _LocalStore(Path(root))
            self.index = _Index(Path(index_path) if index_path is not None else Path(root) / "index.sqlite")

    def add(self, score: ScoreMsg) -> dict | None:
        """Archive one anomalous frame and return its index row; None (nothing written) for a
        score without ``frame_jpeg``. ArchiveError when the frame or its map does not decode."""
        if score.frame_jpeg is None:
            return None
        try:
            check_pixels(score.frame_jpeg, self.max_pixels)  # from the header: nothing decoded yet
        except FrameTooLarge as err:
            raise ArchiveError(f"frame JPEG: {err}") from None
        except ValueError:
            raise ArchiveError(f"frame JPEG does not decode ({len(score.frame_jpeg)} bytes)") from None
        try:
            small = decode_map(score.map)
        except MapError as err:
            raise ArchiveError(str(err)) from None
        frame = cv2.imdecode(np.frombuffer(score.frame_jpeg, np.uint8), cv2.IMREAD_COLOR)
        if frame is None:
            raise ArchiveError(f"frame JPEG does not decode ({len(score.frame_jpeg)} bytes)")
        height, width = frame.shape[:2]
        lo, hi = score.map.lo, score.map.hi
        # the heat is quantised at the map's size and scaled up as 8 bits (a float map at the
        # frame's size would cost 4 bytes per pixel)
        heat_small = np.zeros(small.shape, np.uint8) if hi <= lo else \
            np.clip(np.rint((small - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)
        heat = cv2.resize(heat_small, (width, height), interpolation=cv2.INTER_LINEAR)
        if self.binarize:
            full = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
            mask = np.where(full >= score.threshold, 255, 0).astype(np.uint8)
            del full
        else:
            mask = heat
        overlay = cv2.applyColorMap(heat, cv2.COLORMAP_JET)
        cv2.addWeighted(frame, 1 - OVERLAY_ALPHA, overlay, OVERLAY_ALPHA, 0, dst=overlay)
        del frame

        meta = score.frame
        session = f"{safe_component(meta.session)}/" if meta.session else ""
        base = f"{safe_component(meta.stream)}/{session}{meta.seq:010d}"
        keys = {"frame_path": f"{base}.frame.jpg", "mask_path": f"{base}.mask.png",
                "overlay_path": f"{base}.overlay.jpg"}
        self.store.put(keys["frame_path"], score.frame_jpeg, "image/jpeg")
        self.store.put(keys["mask_path"], _encode(".png", mask), "image/png")
        self.store.put(keys["overlay_path"], _encode(".jpg", overlay, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality]),
                       "image/jpeg")
        row = {"stream": meta.stream, "session": meta.session, "seq": meta.seq, "ts": meta.ts, "pts": meta.pts, "score": score.image_score,
               "threshold": score.threshold, "method": score.method, "class_name": score.class_name,
               "anchor_key": score.anchor_key, "model": score.model,
               "telemetry": meta.telemetry.model_dump() if meta.telemetry else None, **keys,
               "mask_kind": "binary" if self.binarize else "heat", "map_lo": lo, "map_hi": hi,
               "archived_at": time.time()}
        self.store.put(f"{base}.json", json.dumps(row).encode(), "application/json")  # last: marks it complete
        if self.index is not None:
            self.index.upsert(row)
        return row

    def get(self, stream: str, seq: int, session: str = "") -> dict | None:
        """The index row of a frame (None if not archived or there is no SQLite index)."""
        return self.index.get(stream, seq, session) if self.index is not None else None

    def url(self, key: str) -> str:
        """Where a stored path (``frame_path``, ...) lives: a local path or an s3:// URL."""
        return self.store.url(key)

    @property
    def store_name(self) -> str:
        """The store, as outage reports name it."""
        return self.store.name

    def close(self) -> None:
        if self.index is not None:
            self.index.close()


def _encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, data = cv2.imencode(ext, image, params or [])
    if not ok:
        raise ArchiveError(f"cv2 could not encode {ext}")
    return data.tobytes()
