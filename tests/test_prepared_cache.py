"""The start-up cache (workers.prepared_cache): a profile prepared twice with the same inputs
takes its reference memory and threshold from disk; a changed reference image, calibration
image or method option is a new entry, computed again."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from linewatch.scoring.prompts import PromptPack
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.prepared import PreparedProfile
from linewatch.workers.prepared_cache import PreparedCache, cache_folder, default_folder
from linewatch.workers.profiles import StreamProfile


def _images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:02d}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return folder


def _prepare(profile, tiny, cache):
    return PreparedProfile(profile, tiny, PromptPack.load(), AnchorCache(), cache)


def _memories(folder):
    return sorted(p.name for p in folder.glob("memory-*.safetensors"))


@pytest.mark.parametrize("method", ["aprilgan", "winclip"])
def test_a_second_start_reads_the_memory_and_threshold_from_the_cache(method, tiny, tmp_path):
    refs = _images(tmp_path / "refs", 3, seed=1)
    cache = PreparedCache(tmp_path / "cache")
    profile = StreamProfile(method=method, references=str(refs), options={"text_weight": 0})
    first = _prepare(profile, tiny, cache)
    second = _prepare(profile, tiny, cache)
    assert len(_memories(tmp_path / "cache")) == 1
    assert second.threshold == first.threshold
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(second.method.score(images).image_score, first.method.score(images).image_score)


def test_the_cache_is_invalidated_when_a_reference_image_or_an_option_changes(tiny, tmp_path, caplog):
    refs = _images(tmp_path / "refs", 3, seed=1)
    folder = tmp_path / "cache"
    cache = PreparedCache(folder)
    profile = StreamProfile(references=str(refs), options={"text_weight": 0})
    caplog.set_level("INFO", logger="linewatch.workers.prepared")

    def how() -> str:
        return [r.getMessage() for r in caplog.records if "threshold" in r.getMessage()][-1]

    first = _prepare(profile, tiny, cache)
    _prepare(profile, tiny, cache)
    assert how().endswith("cached)")

    _images(tmp_path / "other", 1, seed=9)
    (tmp_path / "other" / "00.png").replace(refs / "01.png")  # same name, other pixels
    changed = _prepare(profile, tiny, cache)
    assert not how().endswith("cached)") and len(_memories(folder)) == 2
    assert changed.threshold != first.threshold

    _prepare(profile.model_copy(update={"options": {"text_weight": 0.25}}), tiny, cache)
    assert not how().endswith("cached)") and len(_memories(folder)) == 3


def test_a_changed_calibration_folder_calibrates_again_with_the_cached_memory(tiny, tmp_path, caplog):
    refs, calibration = _images(tmp_path / "refs", 2, seed=1), _images(tmp_path / "cal", 3, seed=2)
    folder = tmp_path / "cache"
    profile = StreamProfile(references=str(refs), calibration=str(calibration), options={"text_weight": 0})
    caplog.set_level("INFO", logger="linewatch.workers.prepared")
    _prepare(profile, tiny, PreparedCache(folder))
    _images(calibration, 4, seed=3)  # one more image, the others rewritten
    _prepare(profile, tiny, PreparedCache(folder))
    lines = [r.getMessage() for r in caplog.records if "threshold" in r.getMessage()]
    assert "4 calibration images" in lines[-1] and not lines[-1].endswith("cached)")
    assert len(_memories(folder)) == 1  # the references did not change


def test_a_torn_cache_entry_is_computed_again(tiny, tmp_path):
    refs = _images(tmp_path / "refs", 2, seed=1)
    folder = tmp_path / "cache"
    profile = StreamProfile(references=str(refs), threshold=0.4)
    first = _prepare(profile, tiny, PreparedCache(folder))
    for path in folder.glob("memory-*"):
        path.write_bytes(b"not safetensors")
    again = _prepare(profile, tiny, PreparedCache(folder))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.method.score(images).image_score, first.method.score(images).image_score)


def test_the_cache_folder_follows_xdg_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_folder() == tmp_path / "linewatch" / "prepared"
    assert cache_folder(None) == default_folder() and cache_folder("off") is None
    assert cache_folder("~/x") == cache_folder("~/x").expanduser()
