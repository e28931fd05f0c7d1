"""`linewatch eval` end to end on small synthetic MVTec-layout folders (and real data when present)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from linewatch.cli import main

from helpers import make_category

SHARED = Path(os.environ.get("LINEWATCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TINY = ["--arch", "linewatch-tiny"]


def test_eval_single_category_writes_table_and_json(tmp_path, capsys):
    cat = make_category(tmp_path, "widget", seed=0)
    out = tmp_path / "report.json"
    assert main(["eval", "--method", "aprilgan", "--data", str(cat), "--shots", "2", "--json", str(out), *TINY]) == 0
    table = capsys.readouterr().out
    assert "widget" in table and "mean" in table and "linewatch-tiny@random-seed0" in table
    report = json.loads(out.read_text())
    row = report["categories"]["widget"]
    assert (row["images"], row["anomalous"]) == (8, 4)
    assert report["backbone"]["identity"] == "linewatch-tiny@random-seed0"
    # The memory bank must find the pasted squares even with random weights.
    assert row["pixel_auroc"] > 0.8
    assert row["image_auroc"] > 0.8


def test_eval_folder_of_categories_and_missing_masks(tmp_path):
    make_category(tmp_path / "data", "alpha", seed=1)
    make_category(tmp_path / "data", "beta", seed=2, masks=False)
    out = tmp_path / "report.json"
    assert main(["eval", "--method", "winclip", "--data", str(tmp_path / "data"), "--json", str(out), *TINY]) == 0
    report = json.loads(out.read_text())
    assert set(report["categories"]) == {"alpha", "beta"}
    assert report["categories"]["beta"]["pixel_auroc"] is None  # no masks: pixel metrics undefined, not faked
    assert report["categories"]["alpha"]["pixel_auroc"] is not None
    assert report["mean"]["pixel_auroc"] == pytest.approx(report["categories"]["alpha"]["pixel_auroc"])


def test_eval_is_deterministic(tmp_path):
    cat = make_category(tmp_path, "widget", seed=3)
    reports = []
    for run in range(2):
        out = tmp_path / f"r{run}.json"
        assert main(["eval", "--method", "winclip", "--data", str(cat), "--shots", "2", "--json", str(out), *TINY]) == 0
        reports.append(json.loads(out.read_text())["categories"])
    assert reports[0] == reports[1]


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "dataset folder not found: /no/such/folder"),
    (["--data", "{cat}", "--arch", "ViT-Nope"], "unknown open_clip architecture 'ViT-Nope'"),
    (["--data", "{cat}", "--weights", "/no/weights.safetensors", *TINY], "weights file not found"),
    (["--data", "{cat}", "--shots", "9", *TINY], "9 shots asked but train/good has 4 images"),
    (["--data", "{cat}", "--method", "nope", *TINY], "unknown method 'nope'"),
    (["--data", "{cat}", "--image-size", "100", *TINY], "not a multiple of the patch size"),
    (["--data", "{cat}", "--method", "winclip", "--option", "windows=3", *TINY], "winclip has no option windows"),
    (["--data", "{cat}", "--option", "text_weight", *TINY], "expected KEY=VALUE"),
    (["--data", "{cat}", "--arch", "ViT-B-32", "--weights", "openai"], "the pretrained weights ViT-B-32/openai need a download"),
    (["--data", "{cat}", "--option", "text_weight=abc", *TINY], "text_weight must be within [0, 1], got 'abc'"),
    (["--data", "{cat}", "--method", "winclip", "--option", "window_sizes=[0]", *TINY], "window_sizes must be a list of positive patch counts"),
    (["--data", "{cat}", "--method", "aprilgan", "--option", "sigma=abc", *TINY], "sigma must be a number"),
    (["--data", "{cat}", "--json", "{cat}", *TINY], "is a directory"),
    (["--data", "{cat}", "--prompts", "{cat}", *TINY], "cannot read prompt pack"),
    (["--data", "{cat}", "--device", "bogus", *TINY], "unknown device 'bogus'"),
    (["--data", "{cat}", "--weights", "{cat}/train/good/000.png", *TINY], "cannot read"),
])
def test_user_mistakes_get_one_clear_line(tmp_path, capsys, monkeypatch, args, message):
    cat = make_category(tmp_path, "widget", seed=4)
    args = [a.replace("{cat}", str(cat)) for a in args]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a tag download must fail fast and clearly
    try:  # in-process: the command's own error path, without a new interpreter each time
        code = main(["eval", *args])
    except SystemExit as stop:  # argparse's own refusals
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["corrupt.safetensors", "list.pt"])
def test_unusable_weight_files_are_refused(tmp_path, capsys, kind):
    cat = make_category(tmp_path, "widget", seed=6)
    path = tmp_path / kind
    if kind.endswith(".pt"):
        import torch

        torch.save([1, 2, 3], path)  # loads under weights_only, but is no state dict
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["eval", "--data", str(cat), "--weights", str(path), *TINY]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_missing_masks_are_reported(tmp_path, capsys):
    cat = make_category(tmp_path, "widget", seed=7, masks=False)
    assert main(["eval", "--data", str(cat), *TINY]) == 0
    assert "widget: some anomalous images have no <stem>_mask.png" in capsys.readouterr().err


def test_corrupt_image_is_named(tmp_path, capsys):
    cat = make_category(tmp_path, "widget", seed=5)
    bad = cat / "test/good/999.png"
    bad.write_bytes(b"not a png")
    assert main(["eval", "--data", str(cat), *TINY]) == 2
    assert str(bad) in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "datasets/mpdd_metal_plate").is_dir(),
                    reason=f"real data not found at {SHARED}/datasets (set LINEWATCH_SHARED)")
def test_few_shot_on_real_metal_plates(tmp_path):
    """Alignment check on real defects: a memory-bank method must be far above chance even with random weights."""
    out = tmp_path / "mpdd.json"
    assert main(["eval", "--method", "aprilgan", "--data", str(SHARED / "datasets/mpdd_metal_plate"), "--shots", "4",
                 "--image-size", "128", "--json", str(out), *TINY]) == 0
    row = json.loads(out.read_text())["categories"]["mpdd_metal_plate"]
    assert row["pixel_auroc"] > 0.8
    assert row["image_auroc"] > 0.65
