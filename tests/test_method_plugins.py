"""A method from another package, registered through the entry-point group ``linewatch.methods``:
a tiny package written to a temporary folder (its module, a preset folder and its dist-info, as
pip leaves them), put on the path, then listed, trained, evaluated and run on the demo clip with
the real ``linewatch`` command, and held to the method contract (``linewatch.testing``). The
project's own files are not touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from linewatch.synthetic.demo import write_demo_clip
from linewatch.scoring import plugins
from linewatch.scoring.backbone import TINY_ARCH

from helpers import installed_package, make_category

PLUGIN = '''
from pathlib import Path

import torch
from pydantic import Field

from linewatch.scoring.methods.aprilgan import AprilGAN


class PlugGAN(AprilGAN):
    """APRIL-GAN under another name, shipped by a package of its own."""

    name = "plug-gan"
    presets_dir = Path(__file__).parent / "presets"

    class Options(AprilGAN.Options):
        gain: float = Field(1.0, ge=0, description="scales every score")

    def score_batch(self, images):
        scores = super().score_batch(images)
        scores.anomaly_map, scores.image_score = scores.anomaly_map * self.options.gain, scores.image_score * self.options.gain
        return scores


class BatchLeak(AprilGAN):
    """Breaks the contract: each image's score depends on the others in its batch."""

    name = "batch-leak"

    def score_batch(self, images):
        scores = super().score_batch(images)
        scores.anomaly_map = scores.anomaly_map + scores.anomaly_map.mean(dim=0, keepdim=True)
        return scores
'''

ENTRY_POINTS = """[linewatch.methods]
plug-gan = linewatch_plug:PlugGAN
batch-leak = linewatch_plug:BatchLeak
wrong-name = linewatch_plug:PlugGAN
missing = linewatch_plug_gone:Nothing
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    package = installed_package(tmp_path / "site", "linewatch_plug", PLUGIN, "linewatch-plug", "0.1", ENTRY_POINTS,
                                monkeypatch)
    (package / "presets").mkdir()
    preset = json.loads((Path(__file__).parents[1] / "scoring/methods/aprilgan/presets/cpu.json").read_text())
    preset.update(method="plug-gan", description="the plug-in's own preset")
    (package / "presets" / "cpu.json").write_text(json.dumps(preset))
    yield package
    plugins.installed.cache_clear()
    from linewatch.scoring.methods import METHODS

    for name in ("plug-gan", "batch-leak"):
        METHODS.pop(name, None)


def linewatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch", *args], capture_output=True, text=True)


@pytest.mark.services  # whole linewatch processes
def test_a_packaged_method_is_listed_trained_evaluated_and_run(plugin, tmp_path):
    listed = linewatch("methods", "--presets")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line and not line.startswith(" ")}
    assert "(from linewatch-plug 0.1)" in lines["plug-gan"] and "another name" in lines["plug-gan"]
    assert "the plug-in's own preset" in listed.stdout
    assert "unusable" in lines["missing"] and "linewatch_plug_gone" in lines["missing"]
    assert "aprilgan" in lines and "(from" not in lines["aprilgan"]

    data = make_category(tmp_path / "data", "widget", seed=4)
    checkpoint = tmp_path / "plug.safetensors"
    trained = linewatch("train", "--method", "plug-gan", "--data", str(data), "--arch", TINY_ARCH, "--epochs", "1",
                        "--views", "1", "--shots", "2", "--out", str(checkpoint))
    assert trained.returncode == 0, trained.stderr
    assert "the plug-in's own preset" not in trained.stderr  # (the preset is recorded, not shouted)
    evaluated = linewatch("eval", "--checkpoint", str(checkpoint), "--data", str(data))
    assert evaluated.returncode == 0, evaluated.stderr
    assert "plug-gan" in evaluated.stdout

    clip = write_demo_clip(tmp_path / "clip", seconds=1, fps=5, size=(96, 64), references=1)
    ran = linewatch("run", str(clip.video), "--out", str(tmp_path / "run"), "--threshold", "0", "--checkpoint",
                    str(checkpoint), "--class", "widget", "--metrics-port", "off")
    assert ran.returncode == 0, ran.stderr
    assert f"{clip.frame_count} frames scored" in ran.stdout


def test_the_method_contract_holds_for_a_packaged_method_and_catches_a_broken_one(plugin):
    from linewatch.testing import check_method

    assert "its trained state loads back into a fresh instance" in check_method("plug-gan")
    with pytest.raises(AssertionError, match="batch scores differently"):
        check_method("batch-leak")


def test_a_packaged_method_declares_its_options(plugin, tmp_path, capsys, tiny):
    """Its Options model: listed by `linewatch methods NAME`, checked with one line, and used."""
    from linewatch.cli import main
    from linewatch.scoring.methods import create_method

    assert main(["methods", "plug-gan"]) in (0, None)
    listed = capsys.readouterr().out
    assert "(from linewatch-plug 0.1)" in listed and "scales every score" in listed
    assert "text_weight" in listed and "within [0, 1]" in listed  # inherited, with the rule in words

    data = make_category(tmp_path / "data", "widget", seed=5)
    assert main(["eval", "--method", "plug-gan", "--option", "gain=-1", "--data", str(data), "--arch", TINY_ARCH]) == 2
    err = capsys.readouterr().err
    assert "plug-gan: gain input should be greater than or equal to 0, got -1" in err and err.count("\n") == 1, err

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = create_method("plug-gan", tiny).prepare("widget").score(images)
    doubled = create_method("plug-gan", tiny, gain=2.0).prepare("widget").score(images)
    torch.testing.assert_close(doubled.image_score, 2 * plain.image_score)


def test_a_broken_or_misnamed_package_method_gets_one_line(plugin, tmp_path, capsys):
    from linewatch.cli import main

    data = make_category(tmp_path / "data", "widget", seed=5)
    for name, message in (("missing", "cannot be loaded (linewatch_plug_gone:Nothing): ModuleNotFoundError"),
                          ("wrong-name", "its class is named 'plug-gan'")):
        assert main(["eval", "--method", name, "--data", str(data), "--arch", TINY_ARCH]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert main(["eval", "--method", "plug-gun", "--data", "/nowhere"]) == 2
    assert "available: " in capsys.readouterr().err
