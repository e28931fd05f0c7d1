import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from linewatch.scoring.backbone import (
    TINY_ARCH,
    Backbone,
    BackboneConfig,
    BackboneError,
)
from linewatch.scoring.methods import METHODS, AnomalyScores, create_method
from linewatch.scoring.methods.base import gaussian_blur, nearest_distance
from linewatch.scoring.methods.winclip import spread_to_patches, window_index
from linewatch.scoring.prompts import TextAnchors

NAMES = sorted(METHODS)
CLASS = "metal_bracket"  # not in the default pack: shared states only, the cheapest anchors


@pytest.fixture(params=NAMES)
def name(request):
    return request.param


def _needs_vv(request) -> bool:
    name = getattr(getattr(request.node, "callspec", None), "params", {}).get("name")
    return name is not None and METHODS[name].needs_vv_attention


# Each parametrised method runs on the tiny backbone it accepts: the same random weights, with
# the V-V path for a method whose form includes it (KAnoCLIP's CLIP-VV refuses a backbone without).
@pytest.fixture
def tiny(request, tiny, tiny_vv):
    return tiny_vv if _needs_vv(request) else tiny


@pytest.fixture
def tiny_seed1(request, tiny_seed1, tiny_vv_seed1):
    return tiny_vv_seed1 if _needs_vv(request) else tiny_seed1


_ANCHORS: dict = {}


@pytest.fixture
def anchor_cache(tiny):
    """anchor_cache(method_name, class_name): anchors built once per backbone (default pack)."""

    def get(method: str, class_name: str):
        key = (method, class_name, tiny.config)
        if key not in _ANCHORS:
            _ANCHORS[key] = create_method(method, tiny).build_anchors(class_name)
        return _ANCHORS[key]

    return get


def _prepared(name, tiny, anchor_cache, references=None):
    return create_method(name, tiny).prepare(CLASS, references, anchors=anchor_cache(name, CLASS))


def _assert_same(a: AnomalyScores, b: AnomalyScores, atol: float = 0.0):
    torch.testing.assert_close(a.image_score, b.image_score, rtol=0, atol=atol)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=atol)


# ---- registry and life cycle -------------------------------------------------------------

def test_registry_names_every_method_by_its_own_name():
    assert {"winclip", "aprilgan", "aa-clip", "madclip", "kanoclip"} <= set(METHODS)
    assert all(cls.name == key for key, cls in METHODS.items())


def test_unknown_method_lists_available(tiny):
    with pytest.raises(ValueError, match="unknown method 'nope'") as info:
        create_method("nope", tiny)
    assert all(name in str(info.value) for name in METHODS)


@pytest.mark.parametrize("few_shot", [False, True], ids=["zero-shot", "few-shot"])
def test_shapes_and_finite(name, tiny, anchor_cache, make_images, few_shot):
    references = make_images(2, seed=20) if few_shot else None
    method = _prepared(name, tiny, anchor_cache, references)
    assert method.class_name == CLASS
    scores = method.score(make_images(2, seed=21))
    assert scores.image_score.shape == (2,)
    assert scores.anomaly_map.shape == (2, 64, 64)
    assert scores.image_score.dtype == scores.anomaly_map.dtype == torch.float32
    assert torch.isfinite(scores.image_score).all() and torch.isfinite(scores.anomaly_map).all()


def test_other_image_size(name, make_images):
    backbone = Backbone.build(BackboneConfig(arch=TINY_ARCH, image_size=96, vv_attention=METHODS[name].needs_vv_attention))
    method = create_method(name, backbone).prepare("screw", make_images(1, 96, seed=22))
    scores = method.score(make_images(2, 96, seed=23))
    assert scores.image_score.shape == (2,)
    assert scores.anomaly_map.shape == (2, 96, 96)
    assert torch.isfinite(scores.anomaly_map).all()


def test_score_before_prepare(name, tiny, make_images):
    with pytest.raises(RuntimeError, match="prepare"):
        create_method(name, tiny).score(make_images(1))


def test_anchors_for_another_class_rejected(name, tiny, anchor_cache):
    method = create_method(name, tiny)
    with pytest.raises(ValueError, match="another model or prompt set"):
        method.prepare("insulator", anchors=anchor_cache(name, CLASS))
    assert method.anchors is None


def test_anchors_from_another_backbone_rejected(name, tiny, tiny_seed1, anchor_cache):
    assert create_method(name, tiny_seed1).anchor_key(CLASS) != create_method(name, tiny).anchor_key(CLASS)
    with pytest.raises(ValueError, match="another model or prompt set"):
        create_method(name, tiny_seed1).prepare(CLASS, anchors=anchor_cache(name, CLASS))


@pytest.mark.parametrize("name", [n for n in NAMES if not METHODS[n].stages or n == "aprilgan"])  # fixed prompts
def test_built_anchors_are_mean_of_unit_text_embeddings(name, tiny, default_pack, anchor_cache):
    anchors = anchor_cache(name, CLASS)
    normal, abnormal = default_pack.prompts(CLASS)
    for anchor, sentences in [(anchors.normal, normal), (anchors.abnormal, abnormal)]:
        mean = tiny.encode_text(sentences).mean(dim=0)
        torch.testing.assert_close(anchor, mean / mean.norm(), rtol=0, atol=1e-5)
    assert not torch.allclose(anchors.normal, anchors.abnormal, atol=1e-4)


def test_cached_anchors_give_identical_scores(name, tiny, make_images):
    references, images = make_images(2, seed=24), make_images(2, seed=25)
    built = create_method(name, tiny).prepare(CLASS, references)
    cached = TextAnchors.from_bytes(create_method(name, tiny).build_anchors(CLASS).to_bytes())
    reused = create_method(name, tiny).prepare(CLASS, references, anchors=cached)
    assert cached.key == built.anchors.key
    _assert_same(built.score(images), reused.score(images))


@pytest.mark.parametrize("few_shot", [False, True], ids=["zero-shot", "few-shot"])
def test_batch_invariance(name, tiny, anchor_cache, make_images, few_shot):
    method = _prepared(name, tiny, anchor_cache, make_images(3, seed=26) if few_shot else None)
    images = make_images(3, seed=27)
    batch = method.score(images)
    single = [method.score(images[i:i + 1]) for i in range(3)]
    _assert_same(batch, AnomalyScores(torch.cat([s.image_score for s in single]),
                                      torch.cat([s.anomaly_map for s in single])), atol=1e-4)
    assert not torch.allclose(batch.anomaly_map[0], batch.anomaly_map[1], atol=1e-3)


def test_prepare_without_references_clears_memory(name, tiny, anchor_cache, make_images):
    images = make_images(2, seed=28)
    zero_shot = _prepared(name, tiny, anchor_cache).score(images)
    method = _prepared(name, tiny, anchor_cache, make_images(2, seed=29))
    few_shot = method.score(images)
    assert not torch.allclose(few_shot.anomaly_map, zero_shot.anomaly_map, atol=1e-4)
    method.prepare(CLASS, anchors=anchor_cache(name, CLASS))
    _assert_same(method.score(images), zero_shot, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 64, 64), (1, 4, 64, 64), (1, 1, 3, 64, 64)])
def test_wrong_input_shape(name, tiny, anchor_cache, shape):
    method = _prepared(name, tiny, anchor_cache)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        method.score(torch.rand(shape))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        create_method(name, tiny).prepare(CLASS, torch.rand(shape), anchors=anchor_cache(name, CLASS))


def test_size_not_multiple_of_patch(name, tiny, anchor_cache):
    with pytest.raises(BackboneError):
        _prepared(name, tiny, anchor_cache).score(torch.rand(1, 3, 60, 60))


def equal_anchors(method, class_name: str) -> TextAnchors:
    """T_N == T_A (the neutral pack gives that for fixed prompts; learnable prompts differ by
    their context words, so the normal anchor is used twice)."""
    built = method.build_anchors(class_name)
    return TextAnchors(built.normal, built.normal, built.key)


def test_equal_anchors_give_half_everywhere(name, tiny, neutral_pack, make_images):
    """With T_N == T_A every zero-shot probability is exactly 0.5 at every scale and level,
    so the aggregated zero-shot map and image score must be 0.5 too. AA-CLIP's image score
    mixes in its detection token's cosine to T_A alone, which T_N == T_A does not pin down."""
    method = create_method(name, tiny, neutral_pack)
    method.prepare("screw", anchors=equal_anchors(method, "screw"))
    scores = method.score(make_images(2, seed=30))
    if name != "aa-clip":
        torch.testing.assert_close(scores.image_score, torch.full((2,), 0.5), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.anomaly_map, torch.full((2, 64, 64), 0.5), rtol=0, atol=1e-5)


# ---- few-shot signal -----------------------------------------------------------------------

def test_few_shot_localises_pasted_defect(name, tiny, neutral_pack, texture_data):
    """Normal references of a stripe texture; test images are new draws of the texture and
    copies with a saturated square pasted in. The neutral pack makes the zero-shot part a
    constant (random text anchors are noise on the random tiny model), so this measures the
    few-shot memory alone (with the default pack both methods drop to pooled AUROC 0.5-0.6).
    A plain nearest-neighbour memory bank on any tapped layer's tokens scores pixel AUROC
    0.95-0.997 per defect image here; both methods reach the same."""
    method = create_method(name, tiny, neutral_pack)
    method.prepare("textile", texture_data.references, anchors=equal_anchors(method, "textile"))
    defects, normals = method.score(texture_data.defects), method.score(texture_data.normals)
    maps, masks = defects.anomaly_map.numpy(), texture_data.masks
    assert roc_auc_score(masks.ravel(), maps.ravel()) > 0.9
    per_image = [roc_auc_score(m.ravel(), s.ravel()) for m, s in zip(masks, maps)]
    assert min(per_image) > 0.9, per_image
    assert defects.image_score.mean() > normals.image_score.mean()
    # the worst defect image stays above the best normal one on the pixel level, too
    assert maps.reshape(4, -1).max(axis=1).min() > normals.anomaly_map.flatten(1).amax(dim=1).max().item()


def test_failed_prepare_leaves_method_unprepared(name, tiny, anchor_cache, make_images):
    method = _prepared(name, tiny, anchor_cache, references=make_images(2, seed=40))
    with pytest.raises(ValueError):
        method.prepare(CLASS, make_images(2, seed=41)[:, :1], anchors=anchor_cache(name, CLASS))
    assert method.class_name is None
    with pytest.raises(RuntimeError, match="call prepare"):
        method.score(make_images(1, seed=42))


def test_winclip_refuses_images_of_another_size_than_references(tiny, anchor_cache, make_images):
    method = create_method("winclip", tiny).prepare(CLASS, make_images(2, seed=43), anchors=anchor_cache("winclip", CLASS))
    with pytest.raises(ValueError, match="references' size"):
        method.score(make_images(1, height=96, seed=44))


def test_text_weight_zero_ignores_text(name, tiny, default_pack, neutral_pack, texture_data):
    """text_weight=0: few-shot scores come from the references alone, whatever the prompts say."""
    refs = texture_data.references
    with_default = create_method(name, tiny, default_pack, text_weight=0).prepare("textile", refs)
    with_neutral = create_method(name, tiny, neutral_pack, text_weight=0).prepare("textile", refs)
    _assert_same(with_default.score(texture_data.defects), with_neutral.score(texture_data.defects), atol=1e-6)
    # ... while the paper's equal weighting does depend on the text
    paper = create_method(name, tiny, default_pack).prepare("textile", refs).score(texture_data.defects)
    assert not torch.allclose(paper.anomaly_map, with_neutral.score(texture_data.defects).anomaly_map)


def test_options_are_validated(tiny):
    with pytest.raises(ValueError, match="text_weight must be within"):
        create_method("winclip", tiny, text_weight=1.5)
    with pytest.raises(ValueError, match="no option window"):
        create_method("aprilgan", tiny, window=3)


# ---- helpers ----------------------------------------------------------------------------------

def test_window_index_hand_written():
    expected = torch.tensor([[0, 1, 4, 5], [1, 2, 5, 6], [2, 3, 6, 7],
                             [4, 5, 8, 9], [5, 6, 9, 10], [6, 7, 10, 11]])
    assert torch.equal(window_index((3, 4), 2), expected)
    assert torch.equal(window_index((3, 3), 3), torch.arange(9)[None])
    assert torch.equal(window_index((2, 3), 1), torch.arange(6)[:, None])


def test_spread_to_patches_hand_checked():
    # 3x3 patch grid, 2x2 windows: window values [[1, 2], [4, 8]] (row-major order of window_index).
    values = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    mean = torch.tensor([[1.0, 1.5, 2.0], [2.5, 3.75, 5.0], [4.0, 6.0, 8.0]])
    harmonic = torch.tensor([[1.0, 4 / 3, 2.0], [8 / 5, 4 / 1.875, 16 / 5], [4.0, 16 / 3, 8.0]])
    torch.testing.assert_close(spread_to_patches(values, (3, 3), 2, harmonic=False)[0], mean)
    torch.testing.assert_close(spread_to_patches(values, (3, 3), 2, harmonic=True)[0], harmonic)
    # non-square 2x3 grid with 2x2 windows at columns 0 and 1, batch of two
    values = torch.tensor([[1.0, 4.0], [2.0, 2.0]])
    out = spread_to_patches(values, (2, 3), 2, harmonic=True)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 1.6, 4.0]] * 2))
    torch.testing.assert_close(out[1], torch.full((2, 3), 2.0))
    torch.testing.assert_close(spread_to_patches(values, (2, 3), 2, harmonic=False)[0],
                               torch.tensor([[1.0, 2.5, 4.0]] * 2))


def test_nearest_distance_hand_checked():
    memory = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    queries = torch.tensor([[[3.0, 0.0], [0.0, -1.0], [1.0, 1.0]]])
    expected = torch.tensor([[0.0, 1.0, 1 - 2 ** -0.5]])
    torch.testing.assert_close(nearest_distance(queries, memory, chunk=2), expected)


@pytest.mark.parametrize("shape,sigma", [((2, 64, 64), 4.0), ((1, 7, 5), 1.5), ((1, 5, 9), 4.0),
                                         ((3, 20, 30), 0.7), ((1, 16, 16), 2.3)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    maps = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    reference = np.stack([gaussian_filter(m.astype(np.float64), sigma, mode="nearest", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    assert np.abs(ours - maps).max() > 1e-2  # it did blur


def test_gaussian_blur_zero_sigma_is_identity():
    maps = torch.rand(1, 8, 8)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)
