"""CoRe-CLIP on the tiny backbone: CRM's alpha, the masked training views, scoring without
masks, the text losses, options and ablations; and the subject masks of the training format."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linewatch.offline.datasets import DatasetError, find_categories
from linewatch.offline.fewshot import training_set
from linewatch.scoring.methods import create_method
from linewatch.scoring.methods.coreclip.model import (
    TextConditionedFusion,
    alpha_consistency,
    alpha_entropy,
    compatibility,
    consistency_loss,
    grounding_loss,
    orthogonality_loss,
)
from linewatch.scoring.prompts import PromptPack
from linewatch.scoring.training import TrainBatch, TrainConfig, TrainingSet, augment, extract_features, fit, masked_view
from linewatch.scoring.training import view_features as make_view_features

from helpers import make_category

CLASS = "widget"
PACK = PromptPack.model_validate({
    "states": {"normal": ["{}", "flawless {}"], "abnormal": ["damaged {}", "{} with a defect"]},
    "templates": ["a photo of a {}."]})


@pytest.fixture(scope="module")
def subject_set() -> TrainingSet:
    """4 normal and 4 anomalous 64 px images, each with a square subject (a subject mask known
    for the first 6), the anomalous ones' subject in the lower half (the 'wrong place')."""
    rng = np.random.default_rng(5)
    images = (0.4 + 0.05 * rng.standard_normal((8, 3, 64, 64))).astype(np.float32)
    masks, subjects = np.zeros((8, 64, 64), bool), np.zeros((8, 64, 64), bool)
    for i in range(8):
        top = int(rng.integers(34, 48)) if i >= 4 else int(rng.integers(2, 16))
        left = int(rng.integers(4, 44))
        images[i, :, top:top + 14, left:left + 14] = np.array([0.9, 0.8, 0.1], np.float32)[:, None, None]
        subjects[i, top:top + 14, left:left + 14] = True
        if i >= 4:
            masks[i] = subjects[i]
    return TrainingSet(torch.from_numpy(images.clip(0, 1)), torch.from_numpy(masks), torch.tensor([0] * 4 + [1] * 4),
                       [CLASS] * 8, torch.from_numpy(subjects), torch.tensor([True] * 6 + [False] * 2))


def _method(tiny, **options):
    return create_method("core-clip", tiny, PACK, **options)


# ---- CRM ----------------------------------------------------------------------------------

def test_alpha_sums_to_one_and_its_entropy_has_a_gradient():
    torch.manual_seed(0)
    fusion = TextConditionedFusion(16).requires_grad_(True)
    t1, z = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(5, 3, 16), dim=-1)
    alpha = fusion(t1, z)
    assert alpha.shape == (5, 3) and (alpha > 0).all()
    torch.testing.assert_close(alpha.sum(-1), torch.ones(5))
    alpha_entropy(alpha).backward()
    assert fusion.query.weight.grad.abs().sum() > 0 and fusion.key.weight.grad.abs().sum() > 0
    # the entropy is ln 3 for uniform weights, ~0 for one branch; the consistency term 0 for equal weights
    torch.testing.assert_close(alpha_entropy(torch.full((2, 3), 1 / 3)), torch.tensor(math.log(3)))
    assert float(alpha_entropy(torch.tensor([[1.0, 0.0, 0.0]]))) < 1e-9
    assert float(alpha_consistency(alpha.detach(), alpha.detach())) == 0.0
    torch.testing.assert_close(alpha_consistency(torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])),
                               torch.tensor(2.0))


def test_alpha_weights_the_branches_per_image(tiny, subject_set):
    """The method's alpha: one weight per branch and image, summing to one; plain averaging is
    uniform and global-only is 1; the fused score is sigmoid(cos(z, t1) - cos(z, t0))."""
    features = tiny(subject_set.images[:3])
    for options, check in [({}, None), ({"fusion": "mean"}, torch.full((3, 3), 1 / 3)),
                           ({"branches": ["global"]}, torch.ones(3, 1))]:
        method = _method(tiny, **options).prepare(CLASS)
        anchors = method.anchors.stacked().expand(3, -1, -1)
        alpha, score, maps, z = method.image_outputs(features, anchors)
        assert alpha.shape == (3, len(method.branches)) and z.shape == (3, len(method.branches), tiny.embed_dim)
        torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
        if check is not None:
            torch.testing.assert_close(alpha, check)
        fused = F.normalize((alpha[..., None] * z).sum(1), dim=-1)
        expected = torch.sigmoid(fused @ anchors[0, 1] - fused @ anchors[0, 0])
        torch.testing.assert_close(score, expected)
        assert len(maps) == len(tiny.layers) and maps[0].shape == (3, features.grid[0] * features.grid[1])


def test_compatibility_score_is_the_sigmoid_of_the_cosine_margin():
    """z = (0.6, 0.8), t0 = (1, 0), t1 = (0, 1): sigmoid(0.8 - 0.6) = 0.5498."""
    z = torch.tensor([[0.6, 0.8]])
    anchors = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(compatibility(z, anchors), torch.tensor([0.549834]), rtol=0, atol=1e-6)


# ---- text losses --------------------------------------------------------------------------

def test_text_losses_behave_as_stated():
    t0, t1 = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    assert float(orthogonality_loss(t0, t1)) == 0.0  # orthogonal pair
    torch.testing.assert_close(orthogonality_loss(t0, t0), torch.tensor(1.0))  # identical pair
    torch.testing.assert_close(orthogonality_loss(t0, F.normalize(t0 + t1, dim=-1)), torch.tensor(0.5))  # cos^2 45 deg
    prototype = F.normalize(t0 + t1, dim=-1)
    assert abs(float(consistency_loss(t0, t1, prototype))) < 1e-6  # the prototype kept the class embedding
    torch.testing.assert_close(consistency_loss(t0, t1, torch.tensor([[0.0, 0.0, 1.0]])), torch.tensor(1.0))
    assert abs(float(grounding_loss(t0 + t1, prototype))) < 1e-6  # prototype along the image embedding
    torch.testing.assert_close(grounding_loss(t0 + t1, -prototype), torch.tensor(2.0))


def test_text_stage_moves_t0_and_t1_apart(tiny, subject_set):
    """With orthogonality weighted, the text stage lowers t0 . t1 (it starts near 1 on random weights)."""
    method = _method(tiny, loss_weights={"orthogonal": 1.0})
    before = method.class_anchors(CLASS)
    fit(method, subject_set, TrainConfig(epochs=12, lr=1e-2, views=1, batch_size=8))
    after = method.class_anchors(CLASS)
    assert float(after[0] @ after[1]) < float(before[0] @ before[1]) - 0.05


# ---- masked views and scoring without masks ----------------------------------------------

def test_masked_views_are_zero_where_they_should_be(subject_set):
    images, subjects = subject_set.images, subject_set.subject_masks
    subject, context = masked_view(images, subjects, "subject"), masked_view(images, subjects, "context")
    inside = subjects[:, None].expand_as(images)
    assert (subject[~inside] == 0).all() and torch.equal(subject[inside], images[inside])
    assert (context[inside] == 0).all() and torch.equal(context[~inside], images[~inside])
    with pytest.raises(ValueError, match="unknown view 'object'"):
        masked_view(images, subjects, "object")


def test_view_features_come_from_the_masked_images(tiny, subject_set):
    """Images with a subject mask get the features of their masked views; the others (no mask
    known) keep their own, so every branch sees the whole frame there."""
    features = extract_features(tiny, subject_set.images)
    views = make_view_features(tiny, subject_set, features, ("subject", "context"))
    for name in ("subject", "context"):
        expected = tiny(masked_view(subject_set.images[:6], subject_set.subject_masks[:6], name))
        torch.testing.assert_close(views[name].patch_tokens[-1][:6], expected.patch_tokens[-1])
        torch.testing.assert_close(views[name].patch_tokens[-1][6:], features.patch_tokens[-1][6:])
        assert not torch.allclose(views[name].patch_tokens[-1][:6], features.patch_tokens[-1][:6])


def test_training_sees_the_views_and_scoring_needs_no_masks(tiny, subject_set):
    """The image stage's loss changes with the views it is given (the subject branch trains on
    the subject alone); scoring takes images only and every branch sees the whole frame."""
    method = _method(tiny)
    assert method.training_views == ("subject", "context")
    method.begin_stage("image", [CLASS])
    features = extract_features(tiny, subject_set.images)
    views = make_view_features(tiny, subject_set, features, method.training_views)
    batch = TrainBatch(features, subject_set.masks.float(), subject_set.labels, subject_set.class_names, (64, 64))
    without = method.stage_loss("image", batch)
    with_views = method.stage_loss("image", TrainBatch(features, batch.masks, batch.labels, batch.class_names,
                                                       batch.size, views=views))
    assert abs(float(without["view"])) < 1e-6 and float(with_views["view"]) > 0.01
    assert not torch.isclose(without["loss"], with_views["loss"])
    method.end_training()

    fit(method, subject_set, TrainConfig(epochs=2, lr=1e-3, views=1))
    scores = method.prepare(CLASS).score(subject_set.images)  # images only: no mask anywhere
    anchors = method.anchors.stacked().expand(8, -1, -1)
    full = method.backbone(subject_set.images)
    _, expected, _, _ = method.image_outputs(full, anchors)
    torch.testing.assert_close(scores.image_score, expected)


def test_global_only_trains_without_views(tiny, subject_set):
    method = _method(tiny, branches=["global"], fusion="mean")
    assert method.training_views == () and method.crm is None
    history = fit(method, subject_set, TrainConfig(epochs=2, lr=1e-3, views=1))
    assert {h["stage"] for h in history} == {"text", "image"} and all(h["view"] == 0 for h in history[2:])
    assert set(method.trained_state()) == {k for k in method.trained_state() if not k.startswith("crm.")}


def test_untrained_method_is_the_same_in_every_process(tiny):
    a, b = _method(tiny), _method(tiny)
    assert all(torch.equal(a.trained_state()[k], b.trained_state()[k]) for k in a.trained_state())
    assert a.anchor_key(CLASS) == b.anchor_key(CLASS)


@pytest.mark.parametrize("options, message", [
    ({"branches": "global"}, "branches must be a list of distinct names"),
    ({"branches": ["global", "global"]}, "branches must be a list of distinct names"),
    ({"branches": ["object"]}, "branches must be a list of distinct names"),
    ({"branches": []}, "branches must be a list of distinct names"),
    ({"fusion": "sum"}, "fusion must be one of crm, mean"),
    ({"loss_weights": {"ortho": 1}}, "loss_weights takes numbers >= 0"),
    ({"loss_weights": {"entropy": -1}}, "loss_weights takes numbers >= 0"),
    ({"adapt_weight": 1.5}, "adapt_weight must be within"),
    ({"text_layers": 0}, "text_layers must be a whole number"),
    ({"prompt_sample": 0}, "prompt_sample must be a whole number"),
])
def test_bad_options_are_named(tiny, options, message):
    with pytest.raises(ValueError, match=message):
        _method(tiny, **options)


# ---- the training format: subject masks ----------------------------------------------------

def _with_subject_masks(category, skip: str | None = None) -> None:
    """A subject mask beside every image of the category (but ``skip``): a centre square."""
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    for image in sorted(category.rglob("*.png")):
        relative = image.relative_to(category)
        if relative.parts[0] not in ("train", "test") or relative.as_posix() == skip:
            continue
        target = category / "subject_masks" / relative.parent / f"{image.stem}_mask.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), mask)


def test_subject_masks_are_read_beside_each_image(tmp_path):
    root = make_category(tmp_path, "widget", seed=3)
    _with_subject_masks(root, skip="train/good/001.png")
    (category,) = find_categories(root)
    assert category.subject_mask(root / "train/good/000.png") == root / "subject_masks/train/good/000_mask.png"
    assert category.subject_mask(root / "train/good/001.png") is None
    data, _ = training_set([category], 4, 0, 64)
    assert data.subject_known.tolist().count(False) == 1  # train/good/001 has none
    known = data.subject_known
    assert data.subject_masks[known][:, 16:48, 16:48].all() and not data.subject_masks[known][:, :16].any()
    assert not data.subject_masks[~known].any()
    plain, _ = training_set(find_categories(make_category(tmp_path / "b", "widget", seed=3)), 4, 0, 64)
    assert plain.subject_masks is None and plain.subject_known is None


def test_a_damaged_subject_mask_is_named(tmp_path):
    root = make_category(tmp_path, "widget", seed=3)
    _with_subject_masks(root)
    (root / "subject_masks/train/good/000_mask.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="cannot read mask .*subject_masks/train/good/000_mask.png"):
        training_set(find_categories(root), 4, 0, 64)


def test_subject_masks_must_fit_the_set(subject_set):
    with pytest.raises(ValueError, match="subject_masks and subject_known come together"):
        TrainingSet(subject_set.images, subject_set.masks, subject_set.labels, subject_set.class_names,
                    subject_set.subject_masks, None)
    with pytest.raises(ValueError, match="subject masks .* must match masks"):
        TrainingSet(subject_set.images, subject_set.masks, subject_set.labels, subject_set.class_names,
                    subject_set.subject_masks[:, :32], subject_set.subject_known)


def test_augmented_views_keep_subject_masks_on_their_subject(subject_set):
    """Quarter turns and flips move each subject mask with its image: the masked pixels stay
    the subject's colour in every view."""
    views = augment(subject_set, 3, torch.Generator().manual_seed(1))
    assert views.subject_masks.shape == (24, 64, 64) and views.subject_known.tolist() == subject_set.subject_known.tolist() * 3
    for image, subject in zip(views.images, views.subject_masks):
        inside = image[:, subject]
        assert (inside[2] < 0.35).all() and (inside[0] > 0.55).all()  # yellow (brightness moved a little)
