"""The generated context-anomaly set (``linewatch demo OUT --context-set``): layout, masks,
determinism, backgrounds, the CLI."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest

from linewatch.cli import main
from linewatch.synthetic.context_set import ANOMALIES, CATEGORY, Layer, draw_damper, draw_string, render, write_context_set
from linewatch.offline.datasets import find_categories

from helpers import error_line


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return write_context_set(tmp_path_factory.mktemp("ctx"), seed=3, train=3, per_type=2)


def test_the_set_is_in_mvtec_layout_with_subject_masks(small_set):
    (category,) = find_categories(small_set.root.parent)
    assert category.name == CATEGORY and len(category.train_good) == 3 and category.has_masks
    assert sorted({s.defect for s in category.test}) == sorted(["good", *ANOMALIES])
    assert small_set.counts == {"train/good": 3, "test/good": 6, **{f"test/{kind}": 2 for kind in ANOMALIES}}
    for path in [*category.train_good, *(s.path for s in category.test)]:
        subjects = cv2.imread(str(category.subject_mask(path)), cv2.IMREAD_GRAYSCALE) > 127
        assert subjects.shape == cv2.imread(str(path)).shape[:2] and subjects.sum() > 100  # every image has subjects
    for sample in category.test:
        if sample.label:
            truth = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE) > 127
            subjects = cv2.imread(str(category.subject_mask(sample.path)), cv2.IMREAD_GRAYSCALE) > 127
            assert truth.sum() > 50 and not (truth & ~subjects).any()  # the misplaced subject is a subject
            assert (subjects & ~truth).sum() > 50  # and normal subjects are there too


def test_only_the_pairing_is_anomalous(small_set):
    """Every misplaced subject also appears in its normal place in normal images, and every
    anomalous pairing appears in anomalous images only."""
    record = json.loads((small_set.root / "context_set.json").read_text())
    pairings = record["pairings"]
    anomalous = {key for key, n in pairings.items() if n["anomalous"]}
    assert len(anomalous) == len(ANOMALIES) and all(pairings[key]["normal"] == 0 for key in anomalous)
    for subject, place in record["normal_places"].items():
        assert pairings[f"{subject} on {place}"]["normal"] > 0 and pairings[f"{subject} on {place}"]["anomalous"] == 0
    assert {key.split(" on ")[0] for key in anomalous} == set(record["normal_places"])


def test_a_subject_is_drawn_the_same_wherever_it_is():
    a, b = Layer(), Layer()
    draw_damper(a, (60, 40))
    draw_damper(b, (150, 170))
    assert np.array_equal(a.coverage[30:70, 40:90], b.coverage[160:200, 130:180])
    upright, lying = Layer(), Layer()
    draw_string(upright, (128, 40))
    draw_string(lying, (200, 200), angle=90)  # lying on the ground: the same string turned a quarter
    area = int((upright.coverage > 127).sum())
    assert area > 1000 and abs(area - int((lying.coverage > 127).sum())) < 0.02 * area


def test_subject_masks_are_where_the_subject_covers_the_picture():
    rng = np.random.default_rng(0)
    scene = render("string_on_ground", rng, [])
    again = render("string_on_ground", np.random.default_rng(0), [])
    assert np.array_equal(scene.image, again.image) and np.array_equal(scene.anomaly, again.anomaly)
    layer = Layer()
    draw_damper(layer, (100, 100))
    canvas = np.full((256, 256, 3), 200.0, np.float32)
    before = canvas.copy()
    layer.over(canvas)
    changed = np.abs(canvas - before).max(-1) > 0
    assert np.array_equal(changed, layer.coverage > 0)  # untouched wherever the subject is not
    assert (np.abs(canvas - before).max(-1)[layer.coverage > 127] > 60).all()  # clearly drawn where it is


def test_deterministic_by_seed(tmp_path, small_set):
    again = write_context_set(tmp_path / "again", seed=3, train=3, per_type=2)
    assert _digests(again.root) == _digests(small_set.root)
    other = write_context_set(tmp_path / "other", seed=4, train=3, per_type=2)
    assert _digests(other.root)["train/good/000.png"] != _digests(small_set.root)["train/good/000.png"]


def test_real_backgrounds_are_used_when_present(tmp_path):
    folder = tmp_path / "frames" / "site"
    folder.mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(folder / f"f{i}.jpg"), np.full((90, 120, 3), 40 * i + 30, np.uint8))
    written = write_context_set(tmp_path / "out", seed=0, train=2, per_type=1, backgrounds=tmp_path / "frames")
    record = json.loads((written.root / "context_set.json").read_text())
    assert written.backgrounds == tmp_path / "frames" and record["background_frames"] == 2  # the calmer half
    procedural = write_context_set(tmp_path / "proc", seed=0, train=2, per_type=1)
    assert procedural.backgrounds is None
    assert json.loads((procedural.root / "context_set.json").read_text())["background_frames"] == 0
    top_left = lambda root: cv2.imread(str(root / "train/good/000.png"))[:8, :8]  # noqa: E731
    assert not np.array_equal(top_left(written.root), top_left(procedural.root))


def test_context_set_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LINEWATCH_SHARED", str(tmp_path / "no-shared"))
    assert main(["demo", str(tmp_path / "d"), "--context-set", "--train", "2", "--per-type", "1"]) == 0
    out = capsys.readouterr().out
    assert f"context set: {tmp_path / 'd' / CATEGORY}" in out and "procedural" in out
    (category,) = find_categories(tmp_path / "d")
    assert len(category.train_good) == 2 and len(category.test) == 3 + len(ANOMALIES)


@pytest.mark.parametrize("args, message", [
    (["--context-set", "--train", "0"], "--train must be at least 1, got 0"),
    (["--context-set", "--fps", "5"], "--fps: not with --context-set"),
    (["--per-type", "3"], "--per-type: only with --context-set"),
])
def test_context_set_mistakes_get_one_clear_line(tmp_path, capsys, args, message):
    assert main(["demo", str(tmp_path / "d"), *args]) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "d").exists()
