"""The few-shot blend puts text (head) and memory evidence on one scale (``scoring.blend``)."""

import pytest
import torch

from linewatch.scoring.blend import BlendScales, TermScale, blend
from linewatch.scoring.methods import create_method


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho of two maps' pixel orders."""
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def _terms(seed: int, n: int = 3):
    """Per-image terms in different units, as a softmax head and a cosine memory give them: the
    text map spreads by thousandths, the memory map by tenths, and they rank pixels differently."""
    g = torch.Generator().manual_seed(seed)
    text = 0.5 + 1e-3 * torch.randn(n, 8, 8, generator=g)
    memory = 0.3 + 1e-1 * torch.randn(n, 8, 8, generator=g)
    return text, text.flatten(1).mean(1), memory


def test_a_blend_of_differently_scaled_terms_lets_both_count():
    normal = [tuple(t[i:i + 1] for t in _terms(0)) for i in range(3)]  # the references' terms
    scales = BlendScales.measure(normal)
    text, text_score, memory = _terms(1, n=1)

    raw, _ = blend(text, text_score, memory, 0.5, None)
    assert _rank_correlation(raw, memory) > 0.99  # the raw sum: the memory alone decides (the old blend)

    mixed, _ = blend(text, text_score, memory, 0.5, scales)
    assert 0.3 < _rank_correlation(mixed, memory) < 0.9
    assert 0.3 < _rank_correlation(mixed, text) < 0.9


def test_the_blend_moves_monotonically_with_the_weight():
    scales = BlendScales.measure([tuple(t[i:i + 1] for t in _terms(0)) for i in range(3)])
    text, text_score, memory = _terms(2, n=1)
    flat_text, flat_memory = text.flatten(), memory.flatten()
    # a pixel pair the two terms order oppositely
    p, q = next((p, q) for p in range(64) for q in range(64)
                if flat_text[p] > flat_text[q] and flat_memory[p] < flat_memory[q])
    gaps = []
    for w in [0.0, 0.25, 0.5, 0.75, 0.99]:
        mixed = blend(text, text_score, memory, w, scales)[0].flatten()
        gaps.append((mixed[p] - mixed[q]).item())
    assert gaps[0] < 0 < gaps[-1]  # the memory's order at 0, the text's near 1
    assert all(a < b for a, b in zip(gaps, gaps[1:]))


def test_the_ends_of_the_weight_are_each_term_unchanged():
    scales = BlendScales.measure([tuple(t[i:i + 1] for t in _terms(0)) for i in range(3)])
    text, text_score, memory = _terms(3, n=2)
    assert torch.equal(blend(text, text_score, memory, 0.0, scales)[0], memory)
    assert torch.equal(blend(text, text_score, memory, 0.0, scales)[1], memory.flatten(1).amax(1))
    assert torch.equal(blend(text, text_score, memory, 1.0, scales)[0], text)
    assert torch.equal(blend(text, text_score, memory, 1.0, scales)[1], text_score)


def test_a_saturated_term_is_held_to_a_floor_not_divided_by_zero():
    scale = TermScale.of(torch.ones(10))
    assert scale.spread > 0
    assert torch.isfinite(scale.standard(torch.tensor([0.0, 1.0]))).all()


@pytest.mark.parametrize("name", ["aprilgan", "winclip", "kanoclip"])
def test_prepare_measures_the_scales_and_the_snapshot_keeps_them(name, request, make_images):
    """With references and a weight inside (0, 1) prepare measures the scales; a method given the
    snapshot (the start-up cache's path) scores exactly as the one that measured them."""
    tiny = request.getfixturevalue("tiny_vv" if name == "kanoclip" else "tiny")
    options = {"text_weight": 0.5}
    method = create_method(name, tiny, **options)
    references, frames = make_images(3, seed=5), make_images(2, seed=9)
    method.prepare("insulator", reference_images=references)
    assert method.blend_scales is not None
    expected = method.score(frames)

    warm = create_method(name, tiny, **options)
    warm.prepare("insulator", anchors=method.anchors)
    warm.restore_memory(*method.memory_snapshot())
    got = warm.score(frames)
    assert torch.equal(got.anomaly_map, expected.anomaly_map)
    assert torch.equal(got.image_score, expected.image_score)

    memory_only = create_method(name, tiny, **{**options, "text_weight": 0.0})
    memory_only.prepare("insulator", reference_images=references, anchors=method.anchors)
    assert memory_only.blend_scales is None  # one term: nothing to put on a common scale
    assert not torch.allclose(memory_only.score(frames).anomaly_map, expected.anomaly_map)


def test_one_reference_gives_no_scales(tiny, make_images):
    method = create_method("aprilgan", tiny, text_weight=0.5)
    method.prepare("insulator", reference_images=make_images(1, seed=5))
    assert method.blend_scales is None
