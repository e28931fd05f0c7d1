"""A synthetic drone inspection clip with a known defect, for demos and end-to-end tests.

The structure (lattice tower, cross-arm, insulator strings, conductors, a damper) is drawn
once on a large transparent "world" layer, twice: clean and with a burnt insulator. Each
video frame is a camera pose (slow pan, slight zoom and roll wobble) warped out of one of
the two layers over a background that pans slower (parallax), so a defect frame equals the
clean frame at the same pose everywhere but the defect.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..ingest.sources import IMAGE_EXTENSIONS

WORLD_W, WORLD_H = 1600, 1000
VIEW_W = 800  # world pixels across the frame at zoom 1 (the height follows the frame's aspect)
BG_W, BG_H, BG_VIEW_W = 1000, 640, 760  # the background layer, smaller: less upscaling of real images
PARALLAX = 0.35  # the distant background moves this fraction of the structure's motion
ARM_Y = 330  # cross-arm bottom chord
STRING_XS = (480, 600, 1000)  # insulator strings; the middle two stay in view all flight
DEFECT_STRING = 2  # index into STRING_XS
DISCS, DISC_PITCH, DISC_RX, DISC_RY = 9, 20, 34, 9
STEEL = (92, 96, 100)  # BGR, weathered galvanised steel


@dataclass(frozen=True)
class DemoClip:
    folder: Path
    video: Path
    srt: Path
    references: list[Path]
    truth: Path
    fps: float
    frame_count: int
    defect_frames: tuple[int, int]  # first and last frame index (inclusive) showing the defect
    background: Path | None  # the real image behind the scene, if one was used
    calibration: list[Path]  # further normal views at other moments of the flight


BACKGROUND_BLUR = 6.0  # px (sigma) at the background's own resolution
CALM_VIEWS = 10  # real backgrounds are drawn from this many least textured images


def find_backgrounds() -> Path | None:
    """The real UAV background images (``$LINEWATCH_SHARED`` or ``<repo>/../shared``), if present."""
    shared = Path(os.environ.get("LINEWATCH_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    folder = shared / "datasets" / "pld_uav_frames"
    return folder if folder.is_dir() else None


def _cover(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover width x height, then centre-crop."""
    scale = max(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (math.ceil(image.shape[1] * scale), math.ceil(image.shape[0] * scale)),
                         interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return resized[top:top + height, left:left + width].copy()


def _noise(rng: np.random.Generator, cells: tuple[int, int]) -> np.ndarray:
    """Smooth value noise in [-1, 1] over the background: random cells upsampled bicubically."""
    small = rng.uniform(-1, 1, (cells[1], cells[0])).astype(np.float32)
    return cv2.resize(small, (BG_W, BG_H), interpolation=cv2.INTER_CUBIC)


def _procedural_background(rng: np.random.Generator) -> np.ndarray:
    """Hazy sky over rolling terrain, both textured so the camera motion is visible."""
    y = np.linspace(0, 1, BG_H, dtype=np.float32)[:, None, None]
    horizon = 0.42 + 0.03 * _noise(rng, (6, 2))[:, :, None]
    sky = np.array([235, 210, 180], np.float32) * (1 - 0.25 * y) + 12 * _noise(rng, (10, 6))[:, :, None]
    ground_tint = np.array([70, 120, 105], np.float32) + np.array([25, 30, 20], np.float32) * _noise(rng, (8, 5))[:, :, None]
    ground = ground_tint * (0.8 + 0.25 * y) + 18 * _noise(rng, (60, 40))[:, :, None] + 8 * _noise(rng, (250, 160))[:, :, None]
    blend = np.clip((y - horizon) / 0.02 + 0.5, 0, 1)
    return np.clip(sky * (1 - blend) + ground * blend, 0, 255).astype(np.uint8)


def _texture(image: np.ndarray) -> float:
    small = cv2.resize(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), (320, 180), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(small, cv2.CV_32F).var())


def _real_background(folder: Path, rng: np.random.Generator) -> tuple[np.ndarray, Path]:
    """One of the calmest views of the set (sky, hills, water, fields), picked by seed.

    Inspection pilots frame a tower against the sky where they can; and a model with random
    weights (all we have here) sees foliage and shattered glass as the same kind of texture,
    so a clip over trees would test nothing. Busy backgrounds need pretrained weights."""
    views = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            views.append((_texture(image), path, image))
    if not views:
        raise ValueError(f"no readable image under {folder}")
    views.sort(key=lambda v: v[0])
    _, path, image = views[rng.integers(min(CALM_VIEWS, len(views)))]
    # far behind the tower, out of focus in a telephoto inspection shot
    return cv2.GaussianBlur(_cover(image, BG_W, BG_H), (0, 0), BACKGROUND_BLUR), path


def _line(canvas, p, q, width, colour=STEEL):
    cv2.line(canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), colour, width, cv2.LINE_AA)


def _draw_tower(canvas: np.ndarray) -> None:
    """Tapered lattice body with X bracing, an earth-wire peak and a trussed cross-arm."""
    top, bottom, half_top, half_bottom = 180, WORLD_H + 20, 40, 190
    leg = lambda side, y: 800 + side * (half_top + (half_bottom - half_top) * (y - top) / (bottom - top))  # noqa: E731
    for side in (-1, 1):
        _line(canvas, (leg(side, top), top), (leg(side, bottom), bottom), 7)
    levels = [top, 250, ARM_Y, 420, 520, 640, 780, 940, bottom]
    for a, b in zip(levels, levels[1:]):
        _line(canvas, (leg(-1, b), b), (leg(1, b), b), 3)
        _line(canvas, (leg(-1, a), a), (leg(1, b), b), 3)
        _line(canvas, (leg(1, a), a), (leg(-1, b), b), 3)
    apex = (800, 110)
    for side in (-1, 1):
        _line(canvas, apex, (leg(side, top), top), 5)
    _line(canvas, (leg(-1, top), top), apex, 3)
    for side, tip in ((-1, min(STRING_XS) - 40), (1, max(STRING_XS) + 80)):
        body = leg(side, ARM_Y)
        top_chord = ARM_Y - 45
        _line(canvas, (body, top_chord), (tip, ARM_Y - 8), 5)
        _line(canvas, (body, ARM_Y), (tip, ARM_Y), 5)
        chord_y = lambda x: top_chord + (ARM_Y - 8 - top_chord) * (x - body) / (tip - body)  # noqa: E731
        xs = np.linspace(body, tip, 9)
        for i, (x0, x1) in enumerate(zip(xs, xs[1:])):  # Warren truss: diagonals zigzag between chords
            if i % 2 == 0:
                _line(canvas, (x0, ARM_Y), (x1, chord_y(x1)), 2)
            else:
                _line(canvas, (x0, chord_y(x0)), (x1, ARM_Y), 2)


def _disc_y(index: int) -> int:
    return ARM_Y + 28 + index * DISC_PITCH


def _clamp_y() -> int:
    return _disc_y(DISCS - 1) + 26


def _draw_string(canvas: np.ndarray, x: int) -> None:
    """A suspension string: link, a stack of toughened-glass discs on a pin, a clamp."""
    _line(canvas, (x, ARM_Y), (x, _clamp_y()), 4, (70, 72, 75))
    for i in range(DISCS):
        y = _disc_y(i)
        cv2.ellipse(canvas, (x, y + 3), (DISC_RX, DISC_RY), 0, 0, 360, (95, 105, 55), -1, cv2.LINE_AA)  # shadowed rim
        cv2.ellipse(canvas, (x, y), (DISC_RX, DISC_RY), 0, 0, 360, (150, 165, 95), -1, cv2.LINE_AA)
        cv2.ellipse(canvas, (x - 6, y - 3), (DISC_RX - 14, DISC_RY - 5), 0, 0, 360, (200, 215, 160), -1, cv2.LINE_AA)
        cv2.ellipse(canvas, (x, y), (DISC_RX, DISC_RY), 0, 0, 360, (60, 70, 35), 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (x - 9, _clamp_y() - 6), (x + 9, _clamp_y() + 8), (80, 82, 86), -1, cv2.LINE_AA)


def _catenary(x_from: float, x_to: float, y_clamp: float, sag_a: float = 700.0, low_offset: float = 450.0):
    """Points of a conductor from a clamp outwards, lowest ``low_offset`` px away from it."""
    direction = 1 if x_to > x_from else -1
    x_low = x_from + direction * low_offset
    xs = np.linspace(x_from, x_to, 80)
    ys = y_clamp - sag_a * (np.cosh((xs - x_low) / sag_a) - np.cosh((x_from - x_low) / sag_a))
    return np.stack([xs, ys], 1).round().astype(np.int32)


def _draw_conductors(canvas: np.ndarray) -> None:
    for x in STRING_XS:
        for edge in (-60, WORLD_W + 60):
            points = _catenary(x, edge, _clamp_y())
            cv2.polylines(canvas, [points], False, (55, 55, 58), 5, cv2.LINE_AA)
            cv2.polylines(canvas, [points - [0, 1]], False, (120, 120, 125), 1, cv2.LINE_AA)
    # Stockbridge damper on the right-hand span of the middle string: a messenger and two weights.
    points = _catenary(STRING_XS[1], WORLD_W + 60, _clamp_y())
    px, py = points[7]
    _line(canvas, (px, py), (px, py + 14), 3, (70, 70, 72))
    _line(canvas, (px - 28, py + 16), (px + 28, py + 16), 3, (70, 70, 72))
    for dx in (-28, 28):
        cv2.ellipse(canvas, (px + dx, py + 18), (11, 7), 0, 0, 360, (85, 88, 92), -1, cv2.LINE_AA)


def _draw_defect(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A flashover on one string: two discs shattered into a scorched gap, soot around it and
    a red-brown burn streak running down the discs below."""
    x, gap_y = STRING_XS[DEFECT_STRING], (_disc_y(3) + _disc_y(4)) // 2
    soot = np.zeros(canvas.shape[:2], np.float32)
    cv2.ellipse(soot, (x, gap_y + 40), (66, 105), 0, 0, 360, 1.0, -1)
    soot = cv2.GaussianBlur(soot, (0, 0), 12) * 0.6
    canvas[:] = (canvas * (1 - soot[:, :, None])).round().astype(np.uint8)
    angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
    radius = rng.uniform(0.75, 1.2, angles.size)
    gap = np.stack([x + 46 * radius * np.cos(angles), gap_y + 30 * radius * np.sin(angles)], 1).astype(np.int32)
    cv2.fillPoly(canvas, [gap], (22, 24, 30), cv2.LINE_AA)
    _line(canvas, (x, gap_y - 30), (x, gap_y + 30), 3, (105, 110, 118))  # the bare pin shows through
    shard = np.array([[x - 34, gap_y - 20], [x - 10, gap_y - 26], [x - 16, gap_y - 12], [x - 30, gap_y - 8]], np.int32)
    cv2.fillPoly(canvas, [shard], (120, 135, 80), cv2.LINE_AA)  # a fragment of the broken disc
    streak = np.zeros(canvas.shape[:2], np.float32)
    tail = _clamp_y() + 10
    cv2.fillPoly(streak, [np.array([[x - 26, gap_y + 10], [x + 30, gap_y + 10], [x + 8, tail], [x - 4, tail]], np.int32)],
                 1.0, cv2.LINE_AA)
    streak = cv2.GaussianBlur(streak, (0, 0), 3) * 0.8
    burn = np.array([35, 55, 150], np.float32)  # BGR red-brown
    canvas[:] = (canvas * (1 - streak[:, :, None]) + burn * streak[:, :, None]).round().astype(np.uint8)
    # Shattered glass: a web of jagged cracks with glinting edges. Fine, high-contrast texture
    # is what sets damage apart from the smooth surfaces around it at any model's patch scale.
    for _ in range(110):
        start = np.array([x + rng.normal(0, 40), gap_y + rng.uniform(-40, 150)])
        points = [start]
        for _ in range(rng.integers(3, 7)):
            points.append(points[-1] + rng.normal(0, 9, 2))
        crack = np.array(points).round().astype(np.int32)
        cv2.polylines(canvas, [crack], False, (15, 15, 18), 2, cv2.LINE_AA)
        cv2.polylines(canvas, [crack + 2], False, (225, 235, 240), 1, cv2.LINE_AA)


class DemoScene:
    """The scene for one seed and frame size; ``frame(t, defect)`` renders the camera view at
    flight time ``t`` of a ``duration``-second flight."""

    def __init__(self, size: tuple[int, int] = (640, 360), seed: int = 0, duration: float = 12.0,
                 backgrounds: Path | None = None):
        self.width, self.height = size
        self.duration = duration
        rng = np.random.default_rng(seed)
        self.background_path = None
        if backgrounds is not None:
            self.background, self.background_path = _real_background(Path(backgrounds), rng)
        else:
            self.background = _procedural_background(rng)
        defect_seed = rng.integers(1 << 31)
        self.clean = self._layer(lambda canvas: None)
        self.damaged = self._layer(lambda canvas: _draw_defect(canvas, np.random.default_rng(defect_seed)))
        ys, xs = np.nonzero((self.clean != self.damaged).any(axis=2))
        self.defect_world_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        self.phases = rng.uniform(0, 2 * np.pi, 5)

    @staticmethod
    def _layer(extra) -> np.ndarray:
        """The structure as premultiplied BGR + alpha (4 channels, uint8). Drawn over black and
        over white: what changes between the two is where the background shows through."""
        over = []
        for base in (0, 255):
            canvas = np.full((WORLD_H, WORLD_W, 3), base, np.uint8)
            _draw_conductors(canvas)
            _draw_tower(canvas)
            for x in STRING_XS:
                _draw_string(canvas, x)
            extra(canvas)
            over.append(canvas)
        alpha = 255 - (over[1].astype(np.int16) - over[0]).min(axis=2)
        return np.dstack([over[0], np.clip(alpha, 0, 255).astype(np.uint8)])

    def pose(self, t: float) -> np.ndarray:
        """The 2x3 world -> frame matrix: pan left to right, with zoom, roll and a little shake."""
        u, ph = t / self.duration, self.phases
        cx = 670 + 260 * u + 3 * math.sin(2 * math.pi * 0.7 * t + ph[0])
        cy = 440 + 20 * math.sin(2 * math.pi * 0.8 * u + ph[1]) + 2 * math.sin(2 * math.pi * 1.1 * t + ph[2])
        zoom = 1 + 0.02 * math.sin(2 * math.pi * 1.3 * u + ph[3])
        roll = 0.5 * math.sin(2 * math.pi * 0.25 * t + ph[4])
        matrix = cv2.getRotationMatrix2D((cx, cy), roll, zoom * self.width / VIEW_W)
        matrix[:, 2] += (self.width / 2 - cx, self.height / 2 - cy)
        return matrix

    def background_pose(self, t: float) -> np.ndarray:
        """The background's matrix: the same roll and zoom, a fraction of the pan."""
        pose = self.pose(t)
        scale = math.hypot(*pose[0, :2]) * VIEW_W / BG_VIEW_W
        inverse = cv2.invertAffineTransform(pose)
        cx, cy = inverse @ (self.width / 2, self.height / 2, 1)  # world point at the frame centre
        centre = (BG_W / 2 + PARALLAX * (cx - 800), BG_H / 2 + PARALLAX * (cy - 440))
        roll = math.degrees(math.atan2(pose[1, 0], pose[0, 0]))
        matrix = cv2.getRotationMatrix2D(centre, -roll, scale)
        matrix[:, 2] += (self.width / 2 - centre[0], self.height / 2 - centre[1])
        return matrix

    def frame(self, t: float, defect: bool = False) -> np.ndarray:
        size = (self.width, self.height)
        layer = cv2.warpAffine(self.damaged if defect else self.clean, self.pose(t), size, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        background = cv2.warpAffine(self.background, self.background_pose(t), size, flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REFLECT)
        alpha = layer[:, :, 3:].astype(np.float32) / 255
        return (layer[:, :, :3] + background * (1 - alpha)).round().clip(0, 255).astype(np.uint8)

    def defect_box(self, t: float) -> tuple[int, int, int, int]:
        """The defect's bounding box in the frame at time ``t`` (x0, y0, x1, y1), clipped."""
        x0, y0, x1, y1 = self.defect_world_box
        corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], np.float64) @ self.pose(t).T
        lo, hi = np.floor(corners.min(0)), np.ceil(corners.max(0))
        return (int(max(lo[0], 0)), int(max(lo[1], 0)), int(min(hi[0], self.width)), int(min(hi[1], self.height)))


def _srt_cue(index: int, fps: float, start: dt.datetime, duration: float) -> str:
    t0, t1 = index / fps, (index + 1) / fps
    stamp = lambda s: f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d}:{int(s % 60):02d},{int(round(s % 1 * 1000)) % 1000:03d}"  # noqa: E731
    u = t0 / duration
    lat, lon = 22.543100 + 0.00018 * u, 113.945200 + 0.00042 * u + 0.00002 * math.sin(3 * u)
    rel = 60.0 + 0.8 * math.sin(2 * math.pi * u)
    clock = (start + dt.timedelta(seconds=t0)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return (f"{index + 1}\n{stamp(t0)} --> {stamp(t1)}\n"
            f'<font size="28">FrameCnt: {index + 1}, DiffTime: {round(1000 / fps)}ms\n{clock}\n'
            f"[iso : 100] [shutter : 1/1000.0] [fnum : 2.8] [ev : 0] [ct : 5500] [color_md : default] "
            f"[focal_len : 24.00] [latitude: {lat:.6f}] [longitude: {lon:.6f}] "
            f"[rel_alt: {rel:.3f} abs_alt: {rel + 35.2:.3f}] </font>\n")


def _through_codec(images: list[np.ndarray], fps: float, size: tuple[int, int], scratch: Path) -> list[np.ndarray]:
    writer = cv2.VideoWriter(str(scratch), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for image in images:
        writer.write(image)
    writer.release()
    capture, decoded = cv2.VideoCapture(str(scratch)), []
    while len(decoded) < len(images):
        ok, image = capture.read()
        if not ok:
            raise RuntimeError(f"OpenCV cannot read back {scratch}")
        decoded.append(image)
    capture.release()
    scratch.unlink()
    return decoded


def _write_views(views: list[np.ndarray], fps: float, size: tuple[int, int], folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, view in enumerate(_through_codec(views, fps, size, folder.parent / f".{stem}.mp4")):
        paths.append(folder / f"{stem}_{k:02d}.png")
        cv2.imwrite(str(paths[-1]), view)
    return paths


def write_demo_clip(out_dir: Path | str, *, seconds: float = 12.0, fps: float = 10, size: tuple[int, int] = (640, 360),
                    defect: tuple[float, float] = (0.45, 0.7), seed: int = 0, backgrounds: Path | str | None = None,
                    references: int = 8) -> DemoClip:
    """Write ``clip.mp4``, its DJI-style ``clip.srt``, ``references/ref_NN.png`` (normal views
    spread over the flight), ``calibration/cal_NN.png`` (normal views between those) and
    ``truth.json`` into ``out_dir``. The defect shows in frames
    whose time fraction lies in ``[defect[0], defect[1])``."""
    if not 0 <= defect[0] < defect[1] <= 1:
        raise ValueError(f"defect range must satisfy 0 <= start < end <= 1, got {defect}")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, round(seconds * fps))
    first, last = math.ceil(defect[0] * count - 1e-9), math.ceil(defect[1] * count - 1e-9) - 1
    if last < first:
        raise ValueError(f"defect range {defect} covers no frame of a {count}-frame clip")
    scene = DemoScene(size, seed, count / fps, Path(backgrounds) if backgrounds is not None else None)

    video = folder / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {video} (mp4v)")
    boxes = {}
    try:
        for i in range(count):
            writer.write(scene.frame(i / fps, defect=first <= i <= last))
            if first <= i <= last:
                boxes[str(i)] = list(scene.defect_box(i / fps))
    finally:
        writer.release()

    start = dt.datetime(2024, 5, 14, 10, 21, 33)
    srt = folder / "clip.srt"
    srt.write_text("\n".join(_srt_cue(i, fps, start, count / fps) for i in range(count)), encoding="utf-8")

    # References pass through the same video codec as the clip: a user takes them from footage,
    # and a memory of pristine renders would make every codec artefact look like damage.
    flight = count / fps
    views = [scene.frame((k + 0.5) / references * flight) for k in range(references)]
    reference_paths = _write_views(views, fps, size, folder / "references", "ref")
    # Calibration views: more normal frames at random moments of the flight (other poses and
    # shake than the references'), for the alert threshold; never part of the memory.
    times = np.random.default_rng(seed + 1).uniform(0, flight, 2 * references)
    views = [scene.frame(t) for t in sorted(times)]
    calibration_paths = _write_views(views, fps, size, folder / "calibration", "cal")

    truth = folder / "truth.json"
    truth.write_text(json.dumps({
        "fps": fps, "frame_count": count, "width": size[0], "height": size[1],
        "defect_frames": [first, last], "defect_boxes": boxes, "seed": seed,
        "background": str(scene.background_path) if scene.background_path else None,
    }, indent=1), encoding="utf-8")
    return DemoClip(folder, video, srt, reference_paths, truth, float(fps), count, (first, last), scene.background_path,
                    calibration_paths)
