"""The method contract, for a plugin author to run on their method (and run by linewatch's own
tests on a method installed from a package):

    from linewatch.testing import check_method
    check_method("my-method")            # AssertionError naming the first broken promise

Each promise is what the pipeline relies on: the registry finds the method by its name; it scores
only once prepared; maps are [B, H, W] and image scores [B], finite, for any image size that is a
multiple of the patch size; a batch scores as its images one by one; references build a memory
(when the method keeps one) and ``prepare`` without them clears it; a trained state loads back
into a fresh instance with the same scores. It runs on the tiny test architecture with random
weights, on CPU, in a few seconds.
"""

from __future__ import annotations

import torch

from ..scoring.backbone import TINY_ARCH, Backbone, BackboneConfig
from ..scoring.methods import create_method, method_class

CLASS = "widget"


def _images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_scores(scores, count: int, size: int, what: str) -> None:
    assert tuple(scores.anomaly_map.shape) == (count, size, size), \
        f"{what}: anomaly_map is {tuple(scores.anomaly_map.shape)}, expected {(count, size, size)}"
    assert tuple(scores.image_score.shape) == (count,), \
        f"{what}: image_score is {tuple(scores.image_score.shape)}, expected {(count,)}"
    assert torch.isfinite(scores.anomaly_map).all() and torch.isfinite(scores.image_score).all(), f"{what}: not finite"


def check_method(name: str, **options) -> list[str]:
    """Run the contract on the method registered as ``name`` (built with ``options``); returns the
    promises checked, raises AssertionError at the first one broken."""
    checked = []
    cls = method_class(name)
    assert cls.name == name, f"the class registered as {name!r} calls itself {cls.name!r}"
    checked.append("found by its name")
    backbone = Backbone.build(BackboneConfig(arch=TINY_ARCH, vv_attention=cls.needs_vv_attention))
    method = create_method(name, backbone, **options)
    size = backbone.image_size
    try:
        method.score(_images(1, size, 0))
    except RuntimeError:
        checked.append("refuses to score before prepare")
    else:
        raise AssertionError(f"{name} scored before prepare(class_name)")

    method.prepare(CLASS)
    images = _images(3, size, 1)
    together = method.score(images)
    _check_scores(together, 3, size, f"{name} zero-shot")
    alone = [method.score(images[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(torch.cat([s.anomaly_map for s in alone]), together.anomaly_map, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"{name}: a batch scores differently from its images one by one ({m})")
    checked += ["zero-shot maps [B, H, W] and scores [B], finite", "a batch scores as its images one by one"]

    other = size + backbone.patch_size
    _check_scores(method.score(_images(2, other, 2)), 2, other, f"{name} at {other} px")
    checked.append(f"scores another image size ({other} px)")

    if method.memory_bank:
        method.prepare(CLASS, _images(2, size, 3))
        assert method.memory is not None, f"{name} keeps a memory bank but built none from references"
        _check_scores(method.score(images), 3, size, f"{name} few-shot")
        method.prepare(CLASS)
        assert method.memory is None, f"{name}: prepare without references kept the old memory"
        checked.append("references build a memory; prepare without them clears it")

    if cls.stages:
        state = method.trained_state()
        assert state, f"{name} has training stages {cls.stages} but no trained state"
        fresh = create_method(name, backbone, **options)  # the frozen backbone is shared, as in a worker
        fresh.load_trained_state({k: v.clone() for k, v in state.items()})
        fresh.prepare(CLASS)
        torch.testing.assert_close(fresh.score(images).anomaly_map, method.score(images).anomaly_map,
                                   msg=lambda m: f"{name}: its trained state does not load back the same ({m})")
        checked.append("its trained state loads back into a fresh instance")
    return checked
