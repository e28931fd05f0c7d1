"""Few-shot training on the frozen tiny backbone: stage losses, fit, checkpoints and `linewatch train`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_eval_cli import make_category

from linewatch.cli import main
from linewatch.scoring.backbone import TINY_ARCH, Backbone, BackboneConfig
from linewatch.scoring.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from linewatch.scoring.losses import (
    dice_loss,
    focal_loss,
    segmentation_loss,
    siglip_loss,
)
from linewatch.scoring.methods import create_method
from linewatch.scoring.methods.base import CLIP_TEMPERATURE, gaussian_blur, upsample
from linewatch.scoring.prompts import PromptPack
from linewatch.scoring.training import (
    TrainBatch,
    TrainConfig,
    TrainingSet,
    extract_features,
    fit,
)

TRAINABLE = ["aprilgan", "aa-clip", "madclip"]
CLASS = "widget"
# A small pack: cheap text encoding, and AA-CLIP's per-step prompt sample is then the whole pack.
PACK = PromptPack.model_validate({
    "states": {"normal": ["{}", "flawless {}"], "abnormal": ["damaged {}", "{} with a defect"]},
    "templates": ["a photo of a {}.", "a close-up photo of the {}."]})
CONFIG = TrainConfig(epochs=8, lr=1e-3, views=2, batch_size=8, seed=3)  # one rate, so every stage learns in 8 epochs


@pytest.fixture(params=TRAINABLE)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def defect_set() -> TrainingSet:
    """4 normal and 4 defective 64 px images: flat grey texture; defect = a bright noisy 16 px square."""
    rng = np.random.default_rng(7)
    images = (0.45 + 0.03 * rng.standard_normal((8, 3, 64, 64))).astype(np.float32)
    masks = np.zeros((8, 64, 64), bool)
    for i in range(4, 8):
        top, left = rng.integers(4, 44, 2)
        images[i, :, top:top + 16, left:left + 16] = rng.uniform(0.8, 1.0, (3, 16, 16))
        masks[i, top:top + 16, left:left + 16] = True
    return TrainingSet(torch.from_numpy(images.clip(0, 1)), torch.from_numpy(masks),
                       torch.tensor([0] * 4 + [1] * 4), [CLASS] * 8)


@pytest.fixture(scope="module")
def trained(tiny, defect_set):
    """trained(name) -> (method fitted with CONFIG, loss history); fitted once per module."""
    cache = {}

    def get(method_name):
        if method_name not in cache:
            torch.manual_seed(0)
            method = create_method(method_name, tiny, PACK)
            cache[method_name] = method, fit(method, defect_set, CONFIG)
        return cache[method_name]

    return get


def _fresh(name, tiny):
    torch.manual_seed(0)  # the initialisation `trained` started from
    return create_method(name, tiny, PACK)


# ---- methods ----------------------------------------------------------------------------

def test_stage_loss_gradients_reach_stage_parameters_only(name, tiny, defect_set):
    method = _fresh(name, tiny)
    features = extract_features(tiny, defect_set.images)
    batch = TrainBatch(features, defect_set.masks.float(), defect_set.labels, defect_set.class_names, (64, 64))
    for stage in method.stages:
        method.begin_stage(stage, [CLASS])
        parameters = method.stage_parameters(stage)
        assert parameters
        for p in parameters:
            p.requires_grad_(True)
        loss = method.stage_loss(stage, batch)["loss"]
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        ids = {id(p) for p in parameters}
        for key, p in method.named_parameters():
            if key.startswith("backbone."):
                assert p.grad is None, key
            elif id(p) in ids:
                assert p.grad is not None and torch.isfinite(p.grad).all(), key
                # 0-d: MadCLIP's SigLIP bias has an exactly zero gradient at its initial point
                # (bias = -scale/2 and each image's two prompt scores sum to 1).
                assert p.ndim == 0 or p.grad.abs().sum() > 0, key
            else:
                assert p.grad is None, f"{key} is not trained in stage {stage}"
        for p in parameters:
            p.requires_grad_(False)
            p.grad = None


def test_scores_after_fit(name, trained, defect_set):
    method, _ = trained(name)
    with pytest.raises(RuntimeError, match="prepare"):  # anchors from before training are stale
        method.score(defect_set.images[:1])
    for references in (None, defect_set.images[:2]):
        scores = method.prepare(CLASS, references).score(defect_set.images[3:6])
        assert scores.image_score.shape == (3,) and scores.anomaly_map.shape == (3, 64, 64)
        assert torch.isfinite(scores.image_score).all() and torch.isfinite(scores.anomaly_map).all()
    assert not any(p.requires_grad for p in method.parameters())


def test_untrained_aprilgan_is_the_zero_shot_path(tiny, defect_set):
    method = create_method("aprilgan", tiny, PACK).prepare(CLASS)
    images = defect_set.images[2:6]
    features = tiny(images)
    anchors = method.anchors.stacked()

    def probability(embeds):
        return (CLIP_TEMPERATURE * F.normalize(embeds, dim=-1) @ anchors.T).softmax(-1)[..., 1]

    levels = [probability(embeds).view(-1, *features.grid) for embeds in features.patch_embeds]
    expected_map = gaussian_blur(upsample(torch.stack(levels).mean(0), (64, 64)), 4.0)
    scores = method.score(images)
    torch.testing.assert_close(scores.anomaly_map, expected_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.image_score, probability(features.image_embed), rtol=0, atol=1e-6)


# ---- fit ----------------------------------------------------------------------------------

def test_training_loss_decreases(name, trained):
    method, history = trained(name)
    assert [h["stage"] for h in history] == [s for s in method.stages for _ in range(CONFIG.epochs)]
    for stage in method.stages:
        losses = [h["loss"] for h in history if h["stage"] == stage]
        assert all(np.isfinite(losses))
        assert losses[-1] < 0.9 * losses[0], (stage, losses)  # by a margin, not by rounding noise


def test_fit_is_deterministic(name, trained, tiny, defect_set):
    first = trained(name)[0].trained_state()
    again = _fresh(name, tiny)
    initial = {k: v.clone() for k, v in again.trained_state().items()}  # state_dict tensors are live
    fit(again, defect_set, CONFIG)
    second = again.trained_state()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], initial[k]) for k in first)  # training moved something


# ---- checkpoints --------------------------------------------------------------------------

def test_checkpoint_round_trip(name, trained, tiny, defect_set, tmp_path):
    method, history = trained(name)
    training = {"epochs": CONFIG.epochs, "shots": 4, "final_loss": history[-1]["loss"]}
    path = tmp_path / "model.safetensors"
    header = save_checkpoint(path, method, {"sigma": 4.0}, training)
    assert read_header(path) == header
    assert header["method"] == name and header["options"] == {"sigma": 4.0}
    assert header["backbone"]["arch"] == TINY_ARCH and header["backbone"]["weights_identity"] == "random-seed0"
    assert header["backbone"]["image_size"] == 64 and header["backbone"]["layers"] == list(tiny.layers)
    assert header["prompts"] == PACK.model_dump() and header["training"] == training

    loaded = load_checkpoint(path, Backbone.build(BackboneConfig(arch=TINY_ARCH)))
    assert loaded.name == name and loaded.checkpoint == header
    assert loaded.prompt_pack == PACK  # the checkpoint's own pack, not the default one
    assert loaded.anchor_key(CLASS) == method.anchor_key(CLASS)
    images = defect_set.images[2:6]
    ours, theirs = method.prepare(CLASS).score(images), loaded.prepare(CLASS).score(images)
    assert torch.equal(ours.image_score, theirs.image_score) and torch.equal(ours.anomaly_map, theirs.anomaly_map)


def test_anchor_key_follows_trained_text(name, trained, tiny):
    changed = trained(name)[0].anchor_key(CLASS) != _fresh(name, tiny).anchor_key(CLASS)
    assert changed == (name != "aprilgan")  # aprilgan trains no text-side tensor


@pytest.fixture(scope="module")
def aprilgan_checkpoint(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "aprilgan.safetensors"
    save_checkpoint(path, trained("aprilgan")[0], {}, {"epochs": CONFIG.epochs})
    return path


@pytest.mark.parametrize("config, difference", [
    (BackboneConfig(arch=TINY_ARCH, layers=(2, 4)), "tapped layers [1, 2, 3, 4] (this backbone: [2, 4])"),
    (BackboneConfig(arch=TINY_ARCH, image_size=96), "image size 64 (this backbone: 96)"),
    (BackboneConfig(arch=TINY_ARCH, seed=1), "weights 'random-seed0' (this backbone: 'random-seed1')"),
], ids=["layers", "image-size", "weights"])
def test_checkpoint_refused_on_another_backbone(aprilgan_checkpoint, config, difference):
    with pytest.raises(CheckpointError, match="trained for another backbone") as info:
        load_checkpoint(aprilgan_checkpoint, Backbone.build(config))
    assert difference in str(info.value)


def test_files_that_are_not_checkpoints(tiny, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"certainly not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .* as a safetensors checkpoint"):
        load_checkpoint(junk, tiny)
    bare = tmp_path / "bare.safetensors"
    save_file({"weight": torch.zeros(3)}, str(bare))
    with pytest.raises(CheckpointError, match="not a linewatch checkpoint"):
        load_checkpoint(bare, tiny)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors", tiny)


def test_tampered_tensor_is_refused(aprilgan_checkpoint, tiny, tmp_path):
    with safe_open(str(aprilgan_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(aprilgan_checkpoint))
    state["projections.0.bias"] = state["projections.0.bias"] + 1e-3
    tampered = tmp_path / "tampered.safetensors"
    save_file(state, str(tampered), metadata=metadata)
    assert read_header(tampered) == read_header(aprilgan_checkpoint)
    with pytest.raises(CheckpointError, match="do not match the digest"):
        load_checkpoint(tampered, tiny)
    load_checkpoint(aprilgan_checkpoint, tiny)  # the untouched file still loads


# ---- losses -------------------------------------------------------------------------------

def test_segmentation_losses_near_zero_when_right_large_when_wrong():
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:5, 3:6] = 1
    guess = torch.full_like(mask, 0.5)
    for loss in (focal_loss, dice_loss, segmentation_loss):
        right, unsure, wrong = loss(mask, mask), loss(guess, mask), loss(1 - mask, mask)
        assert right < 1e-4 < unsure < wrong, loss.__name__
    empty = torch.zeros(1, 8, 8)
    assert dice_loss(empty, empty) == 0  # an all-normal image predicted all normal


def test_siglip_loss_lower_when_similarity_agrees_with_labels():
    labels = torch.tensor([0, 1, 1])
    agree = F.one_hot(labels, 2).float() * 2 - 1  # +1 for the matching text, -1 for the other
    scale, bias = torch.tensor(10.0).log(), torch.tensor(0.0)
    assert siglip_loss(agree, labels, scale, bias) < siglip_loss(torch.zeros(3, 2), labels, scale, bias) \
        < siglip_loss(-agree, labels, scale, bias)


# ---- CLI ----------------------------------------------------------------------------------

def test_train_then_eval_checkpoint(tmp_path, capsys):
    data = make_category(tmp_path, "widget", seed=11)
    out = tmp_path / "runs" / "x.safetensors"
    args = ["train", "--method", "aa-clip", "--data", str(data), "--arch", "linewatch-tiny", "--epochs", "2",
            "--shots", "2", "--views", "2", "--out", str(out), "--eval", str(data)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "checkpoint written to" in captured.out and "widget" in captured.out
    assert "left out 2 test images the checkpoint was trained on" in captured.err
    header = read_header(out)
    assert header["method"] == "aa-clip" and header["training"]["shots"] == 2
    used = header["training"]["test_images_used"]
    assert len(used) == 2 and all(u["path"].startswith("widget/test/scratch/") and len(u["sha256"]) == 64 for u in used)

    report = tmp_path / "report.json"
    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert f"checkpoint {header['identity']}" in captured.out
    assert "left out 2 test images" in captured.err
    row = json.loads(report.read_text())["categories"]["widget"]
    assert (row["images"], row["anomalous"]) == (6, 2)

    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--arch", "ViT-B-16"]) == 2
    err = capsys.readouterr().err
    assert "trained differently: --arch ViT-B-16 (checkpoint: linewatch-tiny)" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--method", "winclip"], "winclip has nothing to train; trainable methods: aa-clip, aprilgan, madclip"),
    (["--shots", "5"], "widget: 5 normal shots asked but train/good has 4 images"),
    (["--out", "{tmp}/x.pt"], "checkpoints are safetensors files"),
    (["--method", "nope"], "unknown method 'nope'"),
])
def test_train_mistakes_get_one_clear_line(tmp_path, capsys, args, message):
    data = make_category(tmp_path, "widget", seed=12)
    defaults = {"--method": "aprilgan", "--shots": "2", "--out": f"{tmp_path}/x.safetensors"}
    defaults.update(dict(zip(args[::2], (a.replace("{tmp}", str(tmp_path)) for a in args[1::2]))))
    argv = ["train", "--data", str(data), "--arch", "linewatch-tiny", "--epochs", "1",
            *[item for pair in defaults.items() for item in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x.*"))


def test_eval_on_another_dataset_keeps_images_with_the_same_names(tmp_path, capsys):
    """Cross-dataset: only the very files trained on are left out (same name and bytes)."""
    source = make_category(tmp_path / "a", "widget", seed=1)
    target = make_category(tmp_path / "b", "widget", seed=2)  # same category and file names, other images
    out = tmp_path / "x.safetensors"
    assert main(["train", "--method", "aprilgan", "--data", str(source), "--arch", TINY_ARCH, "--epochs", "1",
                 "--shots", "2", "--views", "1", "--out", str(out)]) == 0
    report = tmp_path / "cross.json"
    assert main(["eval", "--checkpoint", str(out), "--data", str(target), "--json", str(report)]) == 0
    assert "left out" not in capsys.readouterr().err
    assert json.loads(report.read_text())["categories"]["widget"]["images"] == 8


@pytest.mark.parametrize("header", ['{"format": "linewatch-checkpoint/1"}', "[1]",
                                    '{"format": "linewatch-checkpoint/1", "method": "aprilgan", "options": {}, '
                                    '"backbone": {"arch": "x"}, "prompts": {}, "training": {}, "identity": "0"}'])
def test_damaged_header_is_named(tmp_path, header):
    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"linewatch": header})
    with pytest.raises(CheckpointError, match="checkpoint format|damaged checkpoint header"):
        read_header(path)


def test_default_rates_are_the_papers_per_stage(tiny, defect_set):
    """AA-CLIP trains its text side at 1e-5 and its image side at 5e-4 (the authors' rates):
    Adam moves each weight by about the rate per step."""
    method = create_method("aa-clip", tiny)
    before = {k: v.clone() for k, v in method.trained_state().items()}
    fit(method, defect_set, TrainConfig(epochs=1, views=1, batch_size=8))
    moved = {k: (v - before[k]).abs().max().item() for k, v in method.trained_state().items()}
    text = max(v for k, v in moved.items() if k.startswith("text."))
    image = max(v for k, v in moved.items() if k.startswith("image."))
    assert 0 < text <= 2e-5 < 1e-4 < image <= 1e-3
