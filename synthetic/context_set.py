"""A generated context-anomaly dataset: power-line parts that look normal, in the wrong place.

Every image is a side view of a cross-arm on a lattice mast, insulator strings hanging from
the arm, conductors sagging from the strings' clamps, Stockbridge dampers on the spans, a tree
and the ground, over a real UAV frame (``pld_uav_frames``) or a procedural sky. Three kinds of
*subject* (damper, insulator string, bird nest) each have a normal *place* (span, cross-arm,
tree). An anomalous image moves one subject to another place that is itself normal elsewhere:

    damper_on_string   a damper slipped from its span onto an insulator string
    string_on_ground   an insulator string lying on the ground (one fewer hangs from the arm)
    nest_on_crossarm   a bird nest built on the cross-arm (none in the tree)

A subject is drawn the same way wherever it is, and every subject and every place also appear
in normal images, so only the pairing of subject and place is anomalous. The layout of every
image (mast side, arm height, string count and positions, damper positions, tree, background
crop, light) is drawn at random, so no single appearance marks an anomaly either.

Written in MVTec layout, plus the subject masks CoRe-CLIP trains on::

    OUT/powerline_context/train/good/000.png
    OUT/powerline_context/test/{good,damper_on_string,...}/000.png
    OUT/powerline_context/ground_truth/<type>/000_mask.png       the misplaced subject
    OUT/powerline_context/subject_masks/<split>/<type>/000_mask.png   every subject in the image
    OUT/powerline_context/context_set.json                        seed, counts, pairings, backgrounds

Masks are exact: each subject is rendered on its own layer and its mask is where that layer
covers the picture (over half opaque, less whatever a later subject hides). Deterministic by
seed: image ``i`` of a split draws from its own generator seeded by (seed, split, i).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .demo import _cover, _texture
from ..ingest.sources import IMAGE_EXTENSIONS

CATEGORY = "powerline_context"
SIZE = 256
ANOMALIES = {
    "damper_on_string": "a damper slipped from its span onto an insulator string",
    "string_on_ground": "an insulator string lying on the ground",
    "nest_on_crossarm": "a bird nest on the cross-arm",
}
NORMAL_PLACES = {"damper": "span", "string": "cross-arm", "nest": "tree"}
SPLITS = {"train": 1, "test": 2}  # part of each image's seed
STEEL = (92, 96, 100)
BACKGROUND_SHARE = 0.5  # real backgrounds come from the calmer half of the frames
DISCS, PITCH = 7, 9


@dataclass
class ContextSet:
    root: Path  # the category folder
    counts: dict[str, int]  # images per split/type, e.g. {"train/good": 32, "test/good": 48, ...}
    backgrounds: Path | None


class Layer:
    """One subject: premultiplied BGR and coverage, drawn with the same anti-aliased strokes."""

    def __init__(self, size: int = SIZE):
        # uint8: OpenCV anti-aliases 8-bit images only
        self.colour = np.zeros((size, size, 3), np.uint8)
        self.coverage = np.zeros((size, size), np.uint8)

    def line(self, p, q, width, colour=STEEL):
        p, q = _pt(p), _pt(q)
        cv2.line(self.colour, p, q, colour, width, cv2.LINE_AA)
        cv2.line(self.coverage, p, q, 255, width, cv2.LINE_AA)

    def ellipse(self, centre, axes, colour, angle=0.0):
        centre, axes = _pt(centre), (max(1, int(round(axes[0]))), max(1, int(round(axes[1]))))
        cv2.ellipse(self.colour, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_AA)
        cv2.ellipse(self.coverage, centre, axes, angle, 0, 360, 255, -1, cv2.LINE_AA)

    @property
    def alpha(self) -> np.ndarray:
        return self.coverage.astype(np.float32) / 255

    def over(self, canvas: np.ndarray) -> None:
        canvas[:] = np.clip(self.colour + canvas * (1 - self.alpha[:, :, None]), 0, 255)


def _pt(p) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _rotate(points: np.ndarray, centre, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return (points - centre) @ rot.T + centre


# ---- subjects: the same drawing wherever they are -------------------------------------------

def draw_string(layer: Layer, top, angle: float = 0.0) -> None:
    """A suspension string from ``top`` downwards (``angle`` degrees from vertical): link, a
    stack of glass discs on a pin, a clamp."""
    top = np.asarray(top, np.float64)
    along = np.array([math.sin(math.radians(-angle)), math.cos(math.radians(-angle))])
    across = np.array([along[1], -along[0]])  # shading turns with the string
    end = top + along * (8 + DISCS * PITCH)
    layer.line(top, end, 2, (70, 72, 75))
    for i in range(DISCS):
        c = top + along * (10 + i * PITCH)
        layer.ellipse(c + 1.5 * along, (12, 4), (95, 105, 55), angle)
        layer.ellipse(c, (12, 4), (150, 165, 95), angle)
        layer.ellipse(c - 2 * across - along, (7, 2), (200, 215, 160), angle)
    layer.line(end - along * 3, end + along * 4, 6, (80, 82, 86))


def string_clamp(top) -> tuple[float, float]:
    return top[0], top[1] + 8 + DISCS * PITCH


def draw_damper(layer: Layer, at) -> None:
    """A Stockbridge damper hanging at ``at``: clamp, messenger cable, two weights."""
    x, y = at
    layer.line((x, y), (x, y + 6), 2, (70, 70, 72))
    layer.line((x - 13, y + 7), (x + 13, y + 7), 2, (70, 70, 72))
    for dx in (-13, 13):
        layer.ellipse((x + dx, y + 8), (5, 3.5), (85, 88, 92))


def draw_nest(layer: Layer, at, rng: np.random.Generator) -> None:
    """A bird nest sitting on ``at`` (its bottom centre): a mound of brown twigs."""
    x, y = at
    layer.ellipse((x, y - 5), (13, 6), (40, 62, 88))
    for _ in range(26):
        a = rng.uniform(0, math.pi)
        r = rng.uniform(4, 13)
        c = np.array([x + r * math.cos(a) * rng.choice([-1, 1]), y - 4 - rng.uniform(0, 7)])
        d = rng.normal(0, 1, 2) * 5
        layer.line(c - d, c + d, 1, tuple(int(v) for v in rng.uniform([25, 45, 70], [60, 95, 130])))


# ---- places: the scene every subject sits in ------------------------------------------------

def _line(canvas, p, q, width, colour=STEEL):
    cv2.line(canvas, _pt(p), _pt(q), colour, width, cv2.LINE_AA)


def _noise(rng: np.random.Generator, cells: tuple[int, int], size: int = SIZE) -> np.ndarray:
    small = rng.uniform(-1, 1, (cells[1], cells[0])).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _sky(rng: np.random.Generator) -> np.ndarray:
    y = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
    tint = np.array([235, 210, 180], np.float32) + rng.uniform(-20, 20, 3).astype(np.float32)
    return np.clip(tint * (1 - 0.25 * y) + 10 * _noise(rng, (6, 6))[:, :, None], 0, 255)


def _background(rng: np.random.Generator, frames: list[np.ndarray]) -> np.ndarray:
    """A random crop of one real frame, out of focus (or a procedural sky)."""
    if not frames:
        return _sky(rng)
    image = frames[rng.integers(len(frames))]
    side = int(min(image.shape[:2]) * rng.uniform(0.55, 1.0))
    y0, x0 = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
    crop = cv2.resize(image[y0:y0 + side, x0:x0 + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return cv2.GaussianBlur(crop, (0, 0), 2.5).astype(np.float32)


def _ground(canvas: np.ndarray, rng: np.random.Generator, top: int) -> None:
    """Soil and grass from ``top`` to the bottom edge."""
    rows = SIZE - top
    tint = np.array([60, 105, 95], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    texture = 22 * _noise(rng, (40, 40))[top:, :, None] + 10 * _noise(rng, (120, 120))[top:, :, None]
    shade = np.linspace(0.85, 1.1, rows, dtype=np.float32)[:, None, None]
    canvas[top:] = np.clip(tint * shade + texture, 0, 255)
    _line(canvas, (0, top), (SIZE, top), 1, tuple(float(v) for v in tint * 0.7))


def _tree(canvas: np.ndarray, rng: np.random.Generator, x: float, ground: int, height: float) -> tuple[float, float]:
    """Trunk, two branches and a crown; returns the fork where a nest may sit."""
    fork = (x, ground - 0.55 * height)
    _line(canvas, (x, ground), fork, 5, (40, 55, 70))
    for side in (-1, 1):
        _line(canvas, fork, (x + side * 0.25 * height, ground - 0.85 * height), 3, (40, 55, 70))
    for _ in range(7):
        c = (x + rng.normal(0, 0.22 * height), ground - height * rng.uniform(0.6, 1.0))
        r = height * rng.uniform(0.13, 0.2)
        colour = tuple(float(v) for v in rng.uniform([30, 80, 40], [60, 130, 80]))
        cv2.circle(canvas, _pt(c), int(r), colour, -1, cv2.LINE_AA)
    return fork


def _mast_and_arm(canvas: np.ndarray, mast_x: float, arm_y: float, arm_from: float, arm_to: float, ground: int):
    """A lattice mast down to the ground and a trussed cross-arm from it."""
    for side in (-1, 1):
        _line(canvas, (mast_x + side * 7, arm_y - 30), (mast_x + side * 14, ground), 3)
    ys = np.linspace(arm_y - 30, ground, 9)
    for a, b in zip(ys, ys[1:]):
        _line(canvas, (mast_x - 7 - 7 * (a - ys[0]) / (ground - ys[0]), a), (mast_x + 7 + 7 * (b - ys[0]) / (ground - ys[0]), b), 1)
    _line(canvas, (arm_from, arm_y), (arm_to, arm_y), 3)
    _line(canvas, (arm_from, arm_y - 9), (arm_to, arm_y - 4), 2)
    xs = np.linspace(arm_from, arm_to, 10)
    for i, (x0, x1) in enumerate(zip(xs, xs[1:])):
        if i % 2 == 0:
            _line(canvas, (x0, arm_y), (x1, arm_y - 7), 1)
        else:
            _line(canvas, (x0, arm_y - 7), (x1, arm_y), 1)


def _catenary(clamp, edge_x: float, sag: float) -> np.ndarray:
    xs = np.linspace(clamp[0], edge_x, 40)
    u = (xs - clamp[0]) / (edge_x - clamp[0])
    ys = clamp[1] + sag * 4 * u * (1.2 - u)  # lowest part of the span short of the frame edge
    return np.stack([xs, ys], 1)


# ---- one image ------------------------------------------------------------------------------

@dataclass
class Scene:
    image: np.ndarray  # BGR uint8
    subjects: np.ndarray  # bool: every subject
    anomaly: np.ndarray  # bool: the misplaced subject (empty for normal images)
    layers: list[tuple[str, str]] = field(default_factory=list)  # (subject, place) per subject drawn


def render(kind: str, rng: np.random.Generator, frames: list[np.ndarray]) -> Scene:
    """One image: ``kind`` is "good" or an ``ANOMALIES`` key."""
    canvas = _background(rng, frames)
    ground = int(SIZE * rng.uniform(0.76, 0.84))
    _ground(canvas, rng, ground)
    left_mast = bool(rng.random() < 0.5)
    mast_x = SIZE * rng.uniform(0.1, 0.2) if left_mast else SIZE * rng.uniform(0.8, 0.9)
    arm_y = SIZE * rng.uniform(0.17, 0.27)
    arm_from, arm_to = (mast_x, SIZE * rng.uniform(0.72, 0.8)) if left_mast else (SIZE * rng.uniform(0.2, 0.28), mast_x)
    tree_x = SIZE * rng.uniform(0.58, 0.74) if left_mast else SIZE * rng.uniform(0.26, 0.42)
    fork = _tree(canvas, rng, tree_x, ground, SIZE * rng.uniform(0.24, 0.32))
    _mast_and_arm(canvas, mast_x, arm_y, min(arm_from, arm_to), max(arm_from, arm_to), ground)

    count = 2 if kind == "string_on_ground" else int(rng.integers(1, 3))
    lo, hi = min(arm_from, arm_to) + 22, max(arm_from, arm_to) - 22
    xs = [rng.uniform(lo, hi)] if count == 1 else sorted([rng.uniform(lo, (lo + hi) / 2 - 10), rng.uniform((lo + hi) / 2 + 10, hi)])
    fallen = int(rng.integers(count)) if kind == "string_on_ground" else None
    hanging = [x for i, x in enumerate(xs) if i != fallen]

    # conductors (places: spans) from every hanging string's clamp to both frame edges
    spans = []
    for x in hanging:
        clamp = string_clamp((x, arm_y))
        for edge in (-10, SIZE + 10):
            points = _catenary(clamp, edge, rng.uniform(14, 26))
            cv2.polylines(canvas, [points.round().astype(np.int32)], False, (55, 55, 58), 2, cv2.LINE_AA)
            spans.append(points)

    layers: list[tuple[str, str, Layer]] = []
    for x in hanging:
        layer = Layer()
        draw_string(layer, (x, arm_y))
        layers.append(("string", "cross-arm", layer))
    dampers = int(rng.integers(1, min(2, len(spans)) + 1))
    for span_index in rng.choice(len(spans), dampers, replace=False)[: dampers - (kind == "damper_on_string")]:
        points = spans[span_index]
        layer = Layer()
        draw_damper(layer, points[int(rng.integers(7, 16))])
        layers.append(("damper", "span", layer))
    nest_in_tree = kind != "nest_on_crossarm" and rng.random() < 0.5
    if nest_in_tree:
        layer = Layer()
        draw_nest(layer, (fork[0] + rng.uniform(-3, 3), fork[1] + 2), rng)
        layers.append(("nest", "tree", layer))

    misplaced = Layer()
    if kind == "damper_on_string":
        x = hanging[int(rng.integers(len(hanging)))]
        draw_damper(misplaced, (x, arm_y + 10 + rng.uniform(1, DISCS - 2) * PITCH))
        layers.append(("damper", "insulator string", misplaced))
    elif kind == "string_on_ground":
        top = (rng.uniform(0.25, 0.6) * SIZE, ground + rng.uniform(6, SIZE - ground - 14))
        draw_string(misplaced, top, angle=rng.choice([-1, 1]) * rng.uniform(80, 95))
        layers.append(("string", "ground", misplaced))
    elif kind == "nest_on_crossarm":
        draw_nest(misplaced, (rng.uniform(min(arm_from, arm_to) + 15, max(arm_from, arm_to) - 15), arm_y - 8), rng)
        layers.append(("nest", "cross-arm", misplaced))
    elif kind != "good":
        raise ValueError(f"unknown image kind {kind!r}; expected good or one of {', '.join(ANOMALIES)}")

    masks = []
    for _, _, layer in layers:
        layer.over(canvas)
        covered = layer.alpha > 0.5
        masks = [m & ~covered for m in masks] + [covered]  # a later subject hides what it covers
    gain = rng.uniform(0.9, 1.1)
    image = np.clip(canvas * gain, 0, 255).round().astype(np.uint8)
    subjects = np.any(masks, axis=0) if masks else np.zeros((SIZE, SIZE), bool)
    anomaly = masks[-1] if kind != "good" else np.zeros((SIZE, SIZE), bool)
    return Scene(image, subjects, anomaly, [(s, p) for s, p, _ in layers])


def _calm_frames(folder: Path | None) -> list[np.ndarray]:
    if folder is None:
        return []
    views = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is not None:
            views.append((_texture(image), path.name, _cover(image, 384, 384)))
    if not views:
        raise ValueError(f"no readable image under {folder}")
    views.sort(key=lambda v: (v[0], v[1]))
    return [image for _, _, image in views[:max(1, int(len(views) * BACKGROUND_SHARE))]]


def write_context_set(out_dir: Path | str, *, seed: int = 0, train: int = 32, per_type: int = 16,
                      backgrounds: Path | str | None = None) -> ContextSet:
    """Write the set into ``out_dir/powerline_context``: ``train`` normal training images,
    ``3 * per_type`` normal and ``per_type`` of each anomaly type for test."""
    if train < 1 or per_type < 1:
        raise ValueError(f"train and per_type must be at least 1, got {train} and {per_type}")
    root = Path(out_dir) / CATEGORY
    frames = _calm_frames(Path(backgrounds) if backgrounds is not None else None)
    plan = [("train", "good", train), ("test", "good", len(ANOMALIES) * per_type),
            *[("test", kind, per_type) for kind in ANOMALIES]]
    counts, pairings = {}, {}
    for split, kind, n in plan:
        folder, subject_folder = root / split / kind, root / "subject_masks" / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        subject_folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, SPLITS[split], list(ANOMALIES).index(kind) + 1 if kind in ANOMALIES else 0, i])
            scene = render(kind, rng, frames)
            stem = f"{i:03d}"
            cv2.imwrite(str(folder / f"{stem}.png"), scene.image)
            cv2.imwrite(str(subject_folder / f"{stem}_mask.png"), scene.subjects.astype(np.uint8) * 255)
            if kind != "good":
                truth = root / "ground_truth" / kind
                truth.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(truth / f"{stem}_mask.png"), scene.anomaly.astype(np.uint8) * 255)
            for index, (subject, place) in enumerate(scene.layers):
                tally = pairings.setdefault(f"{subject} on {place}", {"normal": 0, "anomalous": 0})
                tally["anomalous" if kind != "good" and index == len(scene.layers) - 1 else "normal"] += 1
        counts[f"{split}/{kind}"] = n
    (root / "context_set.json").write_text(json.dumps({
        "seed": seed, "size": SIZE, "counts": counts, "anomalies": ANOMALIES, "normal_places": NORMAL_PLACES,
        "pairings": pairings, "backgrounds": str(backgrounds) if frames else None,
        "background_frames": len(frames)}, indent=1), encoding="utf-8")
    return ContextSet(root, counts, Path(backgrounds) if frames else None)
