"""Frame sources: video files, image folders, network streams and webcams behind one iterator.

Iterating a source yields ``(image_bgr, pts_seconds)`` after two optional reductions:
a target frame rate chosen by timestamp, and a cap on the long side of the image.
``open_source(spec)`` picks the adapter from the spec and fails early with one
``IngestError`` line when the source cannot be read: a file must be a video container or an
image by its first bytes (or a video by its extension), so a text file is never handed to
FFmpeg, which would render it as a video. FFmpeg's own log lines are silenced
(``OPENCV_FFMPEG_LOGLEVEL``, unless set): linewatch says what failed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET; read at FFmpeg's first use

import cv2
import numpy as np

from ..bus.jpeg import DEFAULT_MAX_PIXELS, jpeg_size
from ..bus.outages import Backoff  # re-exported: sources' reconnect delays
from ..bus.redact import redact, register_url_secrets

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".asf", ".ogv", ".3gp", ".mxf", ".dav", ".h264", ".264", ".h265", ".265", ".hevc",
                    ".mjpeg", ".mjpg", ".y4m", ".gif"}
# first bytes of the video containers and images FFmpeg and OpenCV read: (offset, bytes)
_MAGIC = [(4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"wide"), (4, b"free"), (4, b"skip"),  # MP4, MOV, 3GP
          (0, b"\x1a\x45\xdf\xa3"), (0, b"FLV"), (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"), (0, b"OggS"),
          (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"), (0, b"\x00\x00\x00\x01"), (0, b"\x00\x00\x01"),
          (0, b"YUV4MPEG2"), (0, b"\x06\x0e\x2b\x34"), (0, b"DHAV"), (0, b"GIF8"),
          (0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"BM"), (0, b"II*\x00"), (0, b"MM\x00*")]
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
WEBCAM_DEVICE = re.compile(r"^/dev/video(\d+)$")
NETWORK_TIMEOUT_MS = 10_000  # so a silent camera raises a read failure instead of hanging forever


class IngestError(ValueError):
    """A source that cannot be opened or read; the message is one line for the user."""


@dataclass
class SourceCounts:
    read: int = 0  # frames decoded from the source
    thinned: int = 0  # decoded but left out to reach the target fps
    skipped: int = 0  # inputs that could not be decoded (corrupt images)
    reconnects: int = 0  # live streams: successful reconnections after an outage


class FrameRateSelector:
    """Keeps a frame when its timestamp reaches the next due time (due += 1/fps).

    Works on timestamps, not frame indices, so variable-rate and jittery sources still come
    out at the target rate. When the source falls more than one interval behind (a gap in a
    live stream), the schedule restarts from the current frame instead of letting a burst
    of frames through to catch up."""

    EPSILON_S = 1e-3  # millisecond-rounded container timestamps must not miss their slot

    def __init__(self, fps: float | None):
        if fps is not None and not fps > 0:
            raise ValueError(f"target fps must be > 0, got {fps}")
        self.interval = None if fps is None else 1.0 / fps
        self.next_due: float | None = None

    def keep(self, pts: float) -> bool:
        if self.interval is None:
            return True
        if self.next_due is not None and pts + self.EPSILON_S < self.next_due:
            return False
        self.next_due = pts + self.interval if self.next_due is None else self.next_due + self.interval
        if self.next_due <= pts:
            self.next_due = pts + self.interval
        return True


def limit_size(image: np.ndarray, max_size: int | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Downscale so the long side is at most ``max_size`` and the frame holds at most
    ``max_pixels`` (area filter); never upscale."""
    height, width = image.shape[:2]
    scale = _scale(width, height, max_size, max_pixels)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size[0] * size[1] > max_pixels:  # rounded up past the budget
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class Source(ABC):
    """A frame source. ``uri`` is safe to log and publish (stream passwords are masked)."""

    live = False

    def __init__(self, uri: str, name: str, *, fps: float | None = None, max_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.uri, self.name, self.max_size, self.max_pixels = uri, name, max_size, max_pixels
        self.counts = SourceCounts()
        self.selector = FrameRateSelector(fps)

    @property
    def total(self) -> int | None:
        """Frames the source will decode, when known in advance (files, folders)."""
        return None

    @abstractmethod
    def _frames(self) -> Iterator[tuple[np.ndarray, float]]:
        """Every decoded frame with its pts; counts ``read`` and ``skipped`` itself."""

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        try:
            for image, pts in self._frames():
                if not self.selector.keep(pts):
                    self.counts.thinned += 1
                    continue
                yield limit_size(image, self.max_size, self.max_pixels), pts
        finally:
            self.close()

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class VideoFile(Source):
    """A recorded video; pts from the container, or frame index / fps where it is unusable."""

    FALLBACK_FPS = 30.0  # when the container states no frame rate at all

    def __init__(self, path: Path, **options):
        super().__init__(str(path), path.stem, **options)
        self.path = path
        self.capture = cv2.VideoCapture(str(path))
        self.first = self.capture.read()[1] if self.capture.isOpened() else None
        if self.first is None:
            self.capture.release()
            raise IngestError(f"cannot read video {path}: not a video OpenCV can decode")
        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = fps if fps and np.isfinite(fps) and fps > 0 else self.FALLBACK_FPS
        count = int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._total = count if count > 0 else None

    @property
    def total(self) -> int | None:
        return self._total

    def _frames(self):
        index, last, by_index = 0, -1.0, False
        image = self.first
        while image is not None:
            pts = self.capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            # A clock stuck at 0, going backwards or not a number is not trusted again for this file.
            by_index = by_index or not math.isfinite(pts) or (index > 0 and pts <= last)
            pts = index / self.fps if by_index else pts
            self.counts.read += 1
            yield image, pts
            index, last = index + 1, pts
            ok, image = self.capture.read()
            image = image if ok else None

    def close(self) -> None:
        self.capture.release()


def _natural_key(path: Path):
    """frame_2.jpg before frame_10.jpg."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class ImageFolder(Source):
    """Image files of one folder in natural name order, as a stream at ``image_fps`` of pts."""

    def __init__(self, folder: Path, *, image_fps: float = 1.0, **options):
        super().__init__(str(folder), folder.name, **options)
        if not image_fps > 0:
            raise ValueError(f"image_fps must be > 0, got {image_fps}")
        self.image_fps = image_fps
        self.files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                            key=_natural_key)
        if not self.files:
            raise IngestError(f"no images in folder {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")

    @property
    def total(self) -> int:
        return len(self.files)

    def _frames(self):
        for index, path in enumerate(self.files):
            image = self._read(path)
            if image is None:
                self.counts.skipped += 1
                log.warning("skipping %s: not an image OpenCV can decode", path)
                continue
            self.counts.read += 1
            yield image, index / self.image_fps  # pts by file position, so a skip leaves a gap

    def _read(self, path: Path) -> np.ndarray | None:
        """The image, a large JPEG decoded at 1/2, 1/4 or 1/8 scale by libjpeg where that still
        leaves at least what ``max_size`` and ``max_pixels`` keep (a 20000 px photo never
        exists whole in memory)."""
        try:
            data = path.read_bytes()
        except OSError:
            return None
        size = jpeg_size(data)
        flag = _reduction(*size, self.max_size, self.max_pixels) if size else cv2.IMREAD_COLOR
        return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def _scale(width: int, height: int, max_size: int | None, max_pixels: int) -> float:
    """How much ``limit_size`` shrinks a width x height frame (1.0: not at all)."""
    return min(1.0, max_size / max(width, height) if max_size is not None else 1.0,
               math.sqrt(max_pixels / (width * height)))


def _reduction(width: int, height: int, max_size: int | None, max_pixels: int) -> int:
    """The imread flag decoding a width x height JPEG at the smallest scale (1/8, 1/4, 1/2)
    that still holds every pixel ``limit_size`` keeps."""
    scale = _scale(width, height, max_size, max_pixels)
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if factor * scale <= 1.0:
            return flag
    return cv2.IMREAD_COLOR


def mask_password(url: str) -> str:
    """A stream URL safe to log and publish (its credentials and tokens masked)."""
    return redact(url)


class LiveCapture(Source):
    """A network stream or webcam: pts is wall-clock time since the first frame; a lost
    connection is retried with exponential backoff (logged once per outage)."""

    live = True

    def __init__(self, target: str | int, uri: str, name: str, *, backoff: Backoff = Backoff(),
                 stop: threading.Event | None = None, **options):
        super().__init__(uri, name, **options)
        self.target, self.backoff = target, backoff
        self.stop = stop or threading.Event()
        self.capture = self._reconnect(first=True)  # fail at open time, before anything is published

    def _open_once(self) -> cv2.VideoCapture | None:
        if isinstance(self.target, int):
            capture = cv2.VideoCapture(self.target)
        else:
            capture = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS])
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def _reconnect(self, first: bool) -> cv2.VideoCapture | None:
        """Open the capture, retrying with backoff; None only when ``stop`` was set."""
        started, attempt = time.monotonic(), 0
        if not first:
            log.warning("%s: stream lost, reconnecting", self.uri)  # once per outage, not per attempt
        while not self.stop.is_set():
            capture = self._open_once()
            if capture is not None:
                if not first:
                    self.counts.reconnects += 1
                    log.info("%s: reconnected after %d attempt(s), %.1f s", self.uri, attempt + 1,
                             time.monotonic() - started)
                return capture
            if self.backoff.max_retries is not None and attempt >= self.backoff.max_retries:
                what = "cannot open stream" if first else "lost stream"
                raise IngestError(f"{what} {self.uri}: gave up after {attempt + 1} attempt(s)")
            if first and attempt == 0:
                log.warning("%s: cannot open, retrying with backoff", self.uri)
            self.stop.wait(self.backoff.delay(attempt))
            attempt += 1
        return None

    def _frames(self):
        started = None
        while self.capture is not None and not self.stop.is_set():
            ok, image = self.capture.read()
            if not ok or image is None:
                self.capture.release()
                self.capture = self._reconnect(first=False)
                continue
            now = time.monotonic()
            started = now if started is None else started
            self.counts.read += 1
            yield image, now - started

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()


def webcam_index(spec: str) -> int | None:
    """``0`` or ``/dev/video0`` -> 0; anything else -> None."""
    spec = spec.strip()
    device = WEBCAM_DEVICE.match(spec)
    return int(device.group(1)) if device else int(spec) if spec.isdigit() else None


def is_live(spec: str) -> bool:
    """An RTSP/HTTP(S) URL or a webcam (``0``, ``/dev/video0``): a source that connects, and
    may reconnect, rather than a file or folder that must exist now."""
    spec = spec.strip()
    return spec.lower().startswith(STREAM_SCHEMES) or webcam_index(spec) is not None


def open_source(spec: str, *, fps: float | None = None, max_size: int | None = None, image_fps: float = 1.0,
                backoff: Backoff = Backoff(), stop: threading.Event | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """The source a spec names: a video file, an image folder, an RTSP/HTTP(S) URL, or a
    webcam (``0``, ``/dev/video0``). ``fps=None`` keeps every frame; ``max_size`` caps the
    long side and ``max_pixels`` the frame's area; ``image_fps`` spaces folder images in pts;
    ``backoff`` and ``stop`` govern live reconnection."""
    options = dict(fps=fps, max_size=max_size, max_pixels=max_pixels)
    spec = spec.strip()
    if is_live(spec):
        if spec.lower().startswith(STREAM_SCHEMES):
            parts = urlsplit(spec)
            name = f"{parts.hostname or 'stream'}{parts.path}"
            register_url_secrets(spec)  # its credentials and tokens, in any spelling a library logs
            return LiveCapture(spec, mask_password(spec), name, backoff=backoff, stop=stop, **options)
        index = webcam_index(spec)
        return LiveCapture(index, spec, f"webcam{index}", backoff=backoff, stop=stop, **options)
    path = Path(spec).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as err:  # a name too long, a path component that is a file, ...
        raise IngestError(f"no such file or folder: {spec} ({err.strerror})") from None
    if is_dir:
        return ImageFolder(path, image_fps=image_fps, **options)
    if is_file:
        if not _is_media(path):
            raise IngestError(f"{spec} is not a video or an image (give a video file such as MP4, MKV, AVI, MOV or "
                              "MPEG-TS, an image, a folder of images, an rtsp:// or http(s):// URL, or a camera index)")
        return VideoFile(path, **options)
    raise IngestError(f"no such file or folder: {spec}")


def _is_media(path: Path) -> bool:
    """A video container or an image by its first bytes, or a video by its extension."""
    if path.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(200)
    except OSError as err:
        raise IngestError(f"cannot read {path}: {err.strerror}") from None
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:  # MPEG transport stream
        return True
    return any(head[at:at + len(magic)] == magic for at, magic in _MAGIC) or \
        (head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"WEBP"))
