"""BAG-CLIP: its graph (hand-checked), SAFR, the parameter counts that resolve the paper's open
questions, training, checkpoints and the live path, on the tiny backbone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from linewatch.cli import main
from linewatch.synthetic.demo import write_demo_clip
from linewatch.scoring.backbone import TINY_ARCH, Backbone, BackboneConfig
from linewatch.scoring.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from linewatch.scoring.methods import create_method
from linewatch.scoring.methods.bagclip.model import (
    BagClipModel,
    GraphConvolution,
    SqueezeExcitation,
    abnormal_share,
    knn_affinities,
    normalised_adjacency,
    resolve_neighbours,
)
from linewatch.scoring.methods.base import gaussian_blur, upsample
from linewatch.scoring.prompts import PromptPack
from linewatch.scoring.training import TrainBatch, TrainConfig, TrainingSet, extract_features, fit

from helpers import make_category

CLASS = "plate"
PACK = PromptPack.model_validate({
    "states": {"normal": ["{}", "flawless {}"], "abnormal": ["damaged {}", "{} with a defect"]},
    "templates": ["a photo of a {}.", "a close-up photo of the {}."]})
CONFIG = TrainConfig(epochs=10, lr=1e-3, views=2, batch_size=8, seed=5)


@pytest.fixture(scope="module")
def spots() -> TrainingSet:
    """4 normal and 4 defective 64 px images: vertical stripes; defect = a dark 16 px disc."""
    rng = np.random.default_rng(11)
    x = np.arange(64)
    images = np.empty((8, 3, 64, 64), np.float32)
    masks = np.zeros((8, 64, 64), bool)
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(8):
        stripes = 0.5 + 0.2 * np.sin(x / 2.5 + rng.uniform(0, 6.3))[None, None, :]
        images[i] = stripes + 0.02 * rng.standard_normal((3, 64, 64))
        if i >= 4:
            cy, cx = rng.integers(12, 52, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 64
            images[i][:, disc] = 0.05
            masks[i] = disc
    return TrainingSet(torch.from_numpy(images.clip(0, 1)), torch.from_numpy(masks),
                       torch.tensor([0] * 4 + [1] * 4), [CLASS] * 8)


@pytest.fixture(scope="module")
def trained(tiny, spots):
    method = create_method("bag-clip", tiny, PACK)
    return method, fit(method, spots, CONFIG)


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("bagclip") / "bagclip.safetensors"
    save_checkpoint(path, trained[0], {}, {"epochs": CONFIG.epochs})
    return path


# ---- the graph ----------------------------------------------------------------------------

POINTS = [0.0, 1.0, 3.0, 7.0, 12.0]  # five nodes on a line, K = 3


def test_five_node_graph_by_hand():
    """K = 3 nearest others: node 0 (at 0) has 1 (d 1), 2 (d 3), 3 (d 7): sigma_0 = 7; likewise
    sigma = (7, 6, 4, 6, 11). S_ij = exp(-d^2 / (sigma_i sigma_j)), weight ReLU(S_ij - S at the
    3rd neighbour). Row 3: S_34 = e^(-25/66) > S_32 = e^(-16/24) though node 4 is farther (its
    bandwidth is wider). Row 4: S_42 = e^(-81/44) < tau_4 = e^(-121/66): node 2 is among its 3
    nearest yet gets no edge. So 2, 2, 2, 2 and 1 neighbours per row before symmetrising."""
    e = math.exp
    expected = np.zeros((5, 5))
    expected[0, 1], expected[0, 2] = e(-1 / 42) - e(-49 / 42), e(-9 / 28) - e(-49 / 42)
    expected[1, 0], expected[1, 2] = e(-1 / 42) - e(-1), e(-1 / 6) - e(-1)
    expected[2, 1], expected[2, 0] = e(-1 / 6) - e(-2 / 3), e(-9 / 28) - e(-2 / 3)
    expected[3, 2], expected[3, 4] = e(-2 / 3) - e(-1), e(-25 / 66) - e(-1)
    expected[4, 3] = e(-25 / 66) - e(-121 / 66)
    nodes = torch.tensor(POINTS, dtype=torch.float64).view(1, 5, 1)
    directed = knn_affinities(nodes, 3)[0]
    np.testing.assert_allclose(directed.numpy(), expected, rtol=0, atol=1e-12)
    assert (directed > 0).sum(dim=1).tolist() == [2, 2, 2, 2, 1]

    full = expected + expected.T + np.eye(5)  # symmetrised, self-loops
    degree = full.sum(axis=1)
    normalised = normalised_adjacency(directed[None])[0].numpy()
    np.testing.assert_allclose(normalised, full / np.sqrt(np.outer(degree, degree)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(normalised, normalised.T, rtol=0, atol=1e-15)
    assert (np.diag(normalised) > 0).all()
    np.testing.assert_allclose(normalised @ np.sqrt(degree), np.sqrt(degree), rtol=1e-12)  # D^-1/2 A D^-1/2
    assert (normalised[0, 3], normalised[4, 0], normalised[4, 1]) == (0, 0, 0)  # no edge, none made up


def test_neighbours_absolute_or_a_share_of_the_grid():
    assert resolve_neighbours(15, 196) == 15 and resolve_neighbours(15, 1369) == 15
    assert resolve_neighbours(15, 10) == 9  # capped at N - 1 on small grids
    assert resolve_neighbours(0.011, 1369) == 15 and resolve_neighbours(0.011, 196) == 2
    assert resolve_neighbours(0.6, 5) == 3


def test_graph_of_a_batch_is_each_image_alone():
    nodes = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(1))
    batched = knn_affinities(nodes, 5)
    for i in range(3):
        torch.testing.assert_close(batched[i], knn_affinities(nodes[i:i + 1], 5)[0])


def test_sag_is_equivariant_to_the_order_of_patches():
    generator = torch.Generator().manual_seed(2)
    nodes = torch.randn(2, 30, 16, generator=generator)
    order = torch.randperm(30, generator=generator)
    torch.manual_seed(0)
    gcn = GraphConvolution(16, 5)

    def sag(x):
        return gcn(x, normalised_adjacency(knn_affinities(x, 6)))

    torch.testing.assert_close(sag(nodes[:, order]), sag(nodes)[:, order], rtol=1e-5, atol=1e-6)
    # and the whole head: every per-patch embedding moves with its patch, the global one stays
    model = BagClipModel(8, 2, 4, torch.randn(8, 4, generator=generator), neighbours=6, graph_width=12)
    for p in model.parameters():
        p.data.normal_(0, 0.3, generator=generator)  # away from the zero-shot start, so the graph counts
    levels = [torch.randn(2, 30, 8, generator=generator) for _ in range(2)]
    image = torch.randn(2, 4, generator=generator)
    plain, shuffled = model(levels, image), model([t[:, order] for t in levels], image)
    for a, b in zip(plain[0], shuffled[0]):
        torch.testing.assert_close(b, a[:, order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled[1], plain[1])


def test_flat_image_graph_has_only_self_loops_and_finite_gradients():
    """Identical patches (a flat frame) put every distance at 0: bandwidths clamp, no edge gets
    weight, the graph is the identity and gradients stay finite."""
    nodes = torch.ones(1, 12, 4, requires_grad=True)
    adjacency = normalised_adjacency(knn_affinities(nodes, 4))
    torch.testing.assert_close(adjacency[0], torch.eye(12))
    GraphConvolution(4, 2)(nodes, adjacency).sum().backward()
    assert torch.isfinite(nodes.grad).all()


# ---- SAFR, parameter counts, the untrained method -----------------------------------------

def test_safr_gates_lie_in_the_open_unit_interval():
    torch.manual_seed(0)
    safr = SqueezeExcitation(64, reduction=16)
    tokens = torch.randn(2, 9, 64)
    torch.testing.assert_close(safr.gates(tokens), torch.full((2, 64), 0.5))  # W2 = 0 at the start
    safr.excite.weight.data.normal_(0, 1.0)
    gates = safr.gates(tokens)
    assert gates.shape == (2, 64) and safr.squeeze.out_features == 4
    assert 0 < gates.min() and gates.max() < 1 and gates.std() > 0.05
    torch.testing.assert_close(safr(tokens), tokens * gates[:, None])  # one gate per channel, every patch


def test_parameter_counts_at_vit_l_match_the_papers_gcn():
    """ViT-L-14-336, 4 levels of 1024, embed 768: the GCN is Table 4's 1.08 M, the graph
    construction has no parameters (a function), 10.2 M in all against Table 5's 13 M."""
    counts = BagClipModel(1024, 4, 768, torch.zeros(1024, 768)).parameter_counts()
    assert counts == {"safr": 2 * 4096 * 256, "reduction": 4096 * 464, "gcn": 5 * 464 ** 2,
                      "fusion": 4 * (1024 + 464) * 768, "global": 768 ** 2}
    assert round(counts["gcn"] / 1e6, 2) == 1.08 and round(sum(counts.values()) / 1e6, 1) == 10.2
    ablated = BagClipModel(1024, 4, 768, torch.zeros(1024, 768), gcn_layers=0, safr=False).parameter_counts()
    assert ablated["safr"] == ablated["reduction"] == ablated["gcn"] == 0 and ablated["fusion"] == 4 * 1024 * 768


def test_untrained_scores_are_zero_shot_clip(tiny, spots):
    """Gates 0.5, W_proj = [proj; 0], global map = I: the maps are APRIL-GAN's untrained ones and
    the image score is 0.5 CLIP's image probability + 0.5 the map's maximum."""
    method = create_method("bag-clip", tiny, PACK).prepare(CLASS)
    aprilgan = create_method("aprilgan", tiny, PACK).prepare(CLASS)
    images = spots.images[2:6]
    ours, zero_shot = method.score(images), aprilgan.score(images)
    torch.testing.assert_close(ours.anomaly_map, zero_shot.anomaly_map, rtol=0, atol=1e-5)
    features = tiny(images)
    grid_map, _ = method.image_outputs(features, method.anchors.stacked())
    peak = upsample(grid_map, (64, 64)).flatten(1).amax(1)
    torch.testing.assert_close(ours.image_score, 0.5 * zero_shot.image_score + 0.5 * peak, rtol=0, atol=1e-5)


def test_abnormal_share_for_shared_and_per_image_anchors():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    embeds = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two patches
    torch.testing.assert_close(abnormal_share(embeds, anchors), torch.sigmoid(torch.tensor([[-100.0, 100.0]])))
    torch.testing.assert_close(abnormal_share(embeds, anchors[None]), abnormal_share(embeds, anchors))
    torch.testing.assert_close(abnormal_share(embeds[:, 0], anchors), torch.sigmoid(torch.tensor([-100.0])))


@pytest.mark.parametrize("options, message", [
    ({"neighbours": 1}, "neighbours must be"), ({"neighbours": 1.5}, "neighbours must be"),
    ({"neighbours": True}, "neighbours must be"), ({"gcn_layers": -1}, "gcn_layers must be"),
    ({"graph_width": 0}, "graph_width must be"), ({"reduction": 2.0}, "reduction must be"),
    ({"safr": "yes"}, "safr must be"), ({"sigma": -1}, "sigma must be"),
])
def test_bad_options_are_named(tiny, options, message):
    with pytest.raises(ValueError, match=message):
        create_method("bag-clip", tiny, **options)


@pytest.mark.parametrize("options", [{"gcn_layers": 0}, {"safr": False}, {"neighbours": 0.05}, {"neighbours": 40}])
def test_ablations_score(tiny, spots, options):
    method = create_method("bag-clip", tiny, PACK, **options).prepare(CLASS)
    scores = method.score(spots.images[:3])
    assert scores.anomaly_map.shape == (3, 64, 64) and torch.isfinite(scores.anomaly_map).all()
    assert (method.model.gcn is None) == (options.get("gcn_layers") == 0)
    assert (method.model.safr is None) == (options.get("safr") is False)


# ---- training and checkpoints -----------------------------------------------------------

def test_training_learns_the_defect(tiny, trained, spots):
    method, history = trained
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    masks = spots.masks[4:].numpy().ravel()
    untrained = create_method("bag-clip", tiny, PACK).prepare(CLASS).score(spots.images[4:]).anomaly_map
    learnt = method.prepare(CLASS).score(spots.images[4:]).anomaly_map
    before, after = roc_auc_score(masks, untrained.numpy().ravel()), roc_auc_score(masks, learnt.numpy().ravel())
    assert after > max(0.9, before + 0.05), (before, after)
    assert not any(p.requires_grad for p in method.parameters())


def test_gradients_reach_the_trained_parts_only(trained, tiny, spots):
    method, _ = trained
    features = extract_features(tiny, spots.images)
    batch = TrainBatch(features, spots.masks.float(), spots.labels, spots.class_names, (64, 64))
    method.begin_stage("head", [CLASS])
    parameters = method.stage_parameters("head")
    assert {id(p) for p in parameters} == {id(p) for p in method.model.parameters()}
    try:
        for p in parameters:
            p.requires_grad_(True)
        losses = method.stage_loss("head", batch)
        assert set(losses) == {"loss", "seg", "cls"}
        losses["loss"].backward()
        for key, p in method.named_parameters():
            if key.startswith("backbone."):
                assert p.grad is None, key
            else:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key
    finally:
        for p in parameters:
            p.requires_grad_(False)
            p.grad = None
        method.end_training()


def test_checkpoint_round_trip_scores_identically(trained, checkpoint, spots):
    method, _ = trained
    header = read_header(checkpoint)
    assert header["method"] == "bag-clip" and header["backbone"]["arch"] == TINY_ARCH
    loaded = load_checkpoint(checkpoint, Backbone.build(BackboneConfig(arch=TINY_ARCH)))
    images = spots.images[2:7]
    ours, theirs = method.prepare(CLASS).score(images), loaded.prepare(CLASS).score(images)
    assert torch.equal(ours.image_score, theirs.image_score) and torch.equal(ours.anomaly_map, theirs.anomaly_map)


def test_checkpoint_for_another_backbone_is_refused(checkpoint):
    """Other random weights, and another grid (its graph has other nodes): refused, both sides named."""
    cases = [(BackboneConfig(arch=TINY_ARCH, seed=1), "weights 'random-seed0' (this backbone: 'random-seed1')"),
             (BackboneConfig(arch=TINY_ARCH, image_size=96), "image size 64 (this backbone: 96)")]
    for config, difference in cases:
        with pytest.raises(CheckpointError, match="trained for another backbone") as info:
            load_checkpoint(checkpoint, Backbone.build(config))
        assert difference in str(info.value)


def test_train_with_the_paper_preset_then_run_live(tmp_path, capsys):
    """`linewatch train --preset paper` (on the tiny architecture) records the paper's schedule;
    `linewatch run --checkpoint` scores a clip with it, the backbone taken from the checkpoint."""
    data = make_category(tmp_path / "data", "widget", seed=4)
    out = tmp_path / "bagclip.safetensors"
    assert main(["train", "--method", "bag-clip", "--preset", "paper", "--data", str(data), "--arch", TINY_ARCH,
                 "--shots", "2", "--out", str(out)]) == 0
    header = read_header(out)
    assert header["preset"]["file"] == "bundled:bag-clip/paper.json" and header["training"]["views"] == 1
    assert header["training"]["stages"]["head"] == {"epochs": 5, "batch_size": 8, "lr": 1e-3, "lr_milestones": [],
                                                    "lr_gamma": 1.0}
    assert header["options"]["neighbours"] == 15 and header["options"]["memory_bank"] is False
    clip = write_demo_clip(tmp_path / "clip", seconds=1, fps=5, size=(96, 64), references=1)
    capsys.readouterr()
    assert main(["run", str(clip.video), "--out", str(tmp_path / "run"), "--threshold", "0",
                 "--checkpoint", str(out), "--class", "widget"]) == 0, capsys.readouterr().err
    assert f"{clip.frame_count} frames scored" in capsys.readouterr().out


def test_gaussian_smoothing_is_the_last_step(trained, spots):
    method, _ = trained
    method.prepare(CLASS)
    features = method.backbone(spots.images[4:6])
    grid_map, _ = method.image_outputs(features, method.anchors.stacked())
    expected = gaussian_blur(upsample(grid_map, (64, 64)), method.sigma)
    torch.testing.assert_close(method.score_features(features, (64, 64)).anomaly_map, expected)


def test_graph_builds_under_autocast():
    """The head under bf16 autocast (``scripts/graph_bench.py --dtype bf16``): the reduced nodes
    come in bf16, distances and affinities in fp32, and the adjacency is built without a clash."""
    torch.manual_seed(0)
    model = BagClipModel(8, 2, 4, torch.randn(8, 4), neighbours=4, graph_width=12)
    levels = [torch.randn(2, 20, 8) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeds, image = model(levels, torch.randn(2, 4))
    assert all(torch.isfinite(e).all() for e in embeds) and torch.isfinite(image).all()
