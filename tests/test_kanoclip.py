"""KAnoCLIP: the knowledge loss, the knowledge pack and mask descriptions, Bi-CMCI, the
parts that train, checkpoints, and the refusal of a backbone without the V-V path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from linewatch.cli import main
from linewatch.scoring.backbone import TINY_ARCH, Backbone, BackboneConfig
from linewatch.scoring.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from linewatch.scoring.losses import knowledge_loss, segmentation_loss
from linewatch.scoring.methods import create_method
from linewatch.scoring.methods.base import CLIP_TEMPERATURE, gaussian_blur, upsample
from linewatch.scoring.methods.kanoclip.knowledge import KnowledgePack, describe_anomaly
from linewatch.scoring.methods.kanoclip.model import BiCrossAttention
from linewatch.scoring.prompts import PromptPack
from linewatch.scoring.training import TrainBatch, TrainConfig, TrainingSet, extract_features, fit

from helpers import defect_training_set, error_line, make_category

CLASS = "widget"
PACK = PromptPack.model_validate({"states": {"normal": ["{}"], "abnormal": ["damaged {}"]},
                                  "templates": ["a photo of a {}."]})
CONFIG = TrainConfig(epochs=8, lr=1e-3, views=2, batch_size=8, seed=3)
OWN_PACK = {"origin": "mixed", "author": "a test", "default": ["A broken {} with a hole."],
            "classes": {CLASS: ["A widget with a red stain.", "A bent widget."]}}


@pytest.fixture(scope="module")
def defect_set() -> TrainingSet:
    """4 normal and 4 defective 64 px images (``helpers.defect_training_set``)."""
    return defect_training_set(CLASS)


@pytest.fixture(scope="module")
def trained(tiny_vv, defect_set):
    method = create_method("kanoclip", tiny_vv, PACK)
    return method, fit(method, defect_set, CONFIG)


# ---- the knowledge loss (eq. 2) -------------------------------------------------------------

def test_knowledge_loss_is_zero_when_the_abnormal_prompt_is_nearer_and_positive_otherwise():
    """k = (1, 0), a = (0.6, 0.8), n = (0, 1): d(k, a) = sqrt(0.4^2 + 0.8^2) = sqrt(0.8) = 0.894 is
    below d(k, n) = sqrt(2) = 1.414, so L_KD = 0. Swapped, L_KD = sqrt(2) - sqrt(0.8) = 0.5198.
    Lengths do not matter (the embeddings are normalised first); a batch is the mean of its rows."""
    k, a, n = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 2.0]])
    assert knowledge_loss(k, normal=n, abnormal=a).item() == 0.0
    wrong = knowledge_loss(k, normal=a, abnormal=n)
    torch.testing.assert_close(wrong, torch.tensor(math.sqrt(2) - math.sqrt(0.8)))
    assert abs(wrong.item() - 0.5198) < 1e-4
    both = knowledge_loss(k.repeat(2, 1), torch.cat([n, a]), torch.cat([a, n]))
    torch.testing.assert_close(both, wrong / 2)


def test_the_methods_knowledge_term_measures_its_learned_prompts_against_the_knowledge(tiny_vv, defect_set):
    """The stage loss's L_KD is eq. 2 on (k, F_n, F_a), k the mean unit embedding of the class's
    pack descriptions and, for an anomalous image, its mask's description too (eq. 3: N + 1)."""
    method = create_method("kanoclip", tiny_vv, PACK)
    method.begin_training(defect_set)
    assert method.image_descriptions[:4] == [None] * 4
    assert all(text.startswith("The widget has a ") for text in method.image_descriptions[4:])
    known = tiny_vv.encode_text(method.knowledge.descriptions(CLASS, CLASS))
    own = tiny_vv.encode_text([method.image_descriptions[5]])
    index = torch.tensor([1, 5])
    features = extract_features(tiny_vv, defect_set.images[index])
    batch = TrainBatch(features, defect_set.masks[index].float(), defect_set.labels[index], [CLASS] * 2, (64, 64), index)
    expected_k = torch.stack([known.mean(0), torch.cat([known, own]).mean(0)])
    torch.testing.assert_close(method.batch_knowledge(batch), expected_k)
    text = method.class_anchors(CLASS).detach()
    normal, abnormal = text[None, 0].expand(2, -1), text[None, 1].expand(2, -1)
    term = method.stage_loss("joint", batch)["knowledge"].detach()
    torch.testing.assert_close(term, knowledge_loss(expected_k, normal, abnormal))


# ---- knowledge packs and mask descriptions ---------------------------------------------------

def test_the_bundled_pack_is_human_written_and_covers_our_classes(default_pack):
    pack = KnowledgePack.load()
    assert pack.origin == "human-written" and "no language model" in pack.author
    ours = ["insulator", "suspension_clamp", "vibration_damper", "spacer", "tower_plate", "conductor"]
    for name in ours + [c for c in default_pack.classes if c not in ours]:
        assert len(pack.classes[name]) == 5, name
    assert len(pack.default) == 5
    assert pack.descriptions("gizmo", "gizmo")[0] == ("An abnormal image of a gizmo shows a crack, a hole or a "
                                                      "missing piece that breaks its regular outline.")


@pytest.mark.parametrize("change, message", [
    ({"origin": "gpt"}, "origin"),
    ({"default": []}, "at least one description"),
    ({"classes": {"x": ["a {name} here"]}}, "x: description"),
    ({"classes": {"x": ["word " * 41]}}, "at most|1 to 40 words"),
    ({"extra": 1}, "extra"),
])
def test_bad_packs_are_refused_with_the_reason(tmp_path, change, message):
    path = tmp_path / "pack.yaml"
    path.write_text(yaml.safe_dump({**OWN_PACK, **change}))
    with pytest.raises(ValueError, match=message):
        KnowledgePack.load(path)
    with pytest.raises(ValueError, match="knowledge pack not found"):
        KnowledgePack.load(tmp_path / "missing.yaml")


def _square(mask_box, colour, size=64, background=0.5):
    image = torch.full((3, size, size), background)
    mask = torch.zeros(size, size, dtype=torch.bool)
    top, bottom, left, right = mask_box
    image[:, top:bottom, left:right] = torch.tensor(colour)[:, None, None]
    mask[top:bottom, left:right] = True
    return image, mask


@pytest.mark.parametrize("box, colour, expected", [
    ((2, 10, 2, 10), (0.9, 0.1, 0.1),
     "The plate has a small, rectangular red defect in the upper left, darker than its surroundings."),
    ((28, 36, 4, 60), (0.05, 0.05, 0.05),
     "The plate has a medium-sized, thin, elongated black defect in the centre, darker than its surroundings."),
    ((50, 62, 50, 62), (0.95, 0.95, 0.9),
     "The plate has a medium-sized, rectangular white defect in the lower right, brighter than its surroundings."),
])
def test_mask_descriptions_say_where_how_large_what_shape_and_colour(box, colour, expected):
    assert describe_anomaly(*_square(box, colour), "plate") == expected


def test_mask_descriptions_count_regions_and_skip_normal_images():
    image, mask = _square((2, 10, 2, 10), (0.1, 0.2, 0.8))
    mask[40:60, 30:50] = True
    text = describe_anomaly(image, mask, "tile")
    assert text.startswith("The tile has two defective regions; the largest is a medium-sized, rectangular ")
    assert "at the bottom" in text
    assert describe_anomaly(image, torch.zeros_like(mask), "tile") is None


# ---- Bi-CMCI -------------------------------------------------------------------------------

def _randomised(block: torch.nn.Module) -> torch.nn.Module:
    """Every weight drawn at random (an untrained block's output projections are zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return block


def test_bicmci_is_permutation_equivariant_over_patches():
    block = _randomised(BiCrossAttention(32))
    visual, text = torch.randn(2, 20, 32), torch.randn(2, 2, 32)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    out_visual, out_text = block(visual, text)
    permuted_visual, permuted_text = block(visual[:, order], text)
    torch.testing.assert_close(permuted_visual, out_visual[:, order], rtol=0, atol=1e-5)
    torch.testing.assert_close(permuted_text, out_text, rtol=0, atol=1e-5)  # the text sees a set of patches
    assert not torch.allclose(out_visual, visual, atol=1e-2) and not torch.allclose(out_text, text, atol=1e-2)


def test_an_untrained_bicmci_block_is_the_identity():
    block = BiCrossAttention(32)
    visual, text = torch.randn(2, 20, 32), torch.randn(2, 2, 32)
    out_visual, out_text = block(visual, text)
    assert torch.equal(out_visual, visual) and torch.equal(out_text, text)


def test_untrained_scores_are_eq_9_10_12(tiny_vv, make_images):
    """Untrained Bi-CMCI is the identity: M^a = mean over levels of softmax(100 cos(V-V patch
    embedding, (F_n, F_a)))[a]; M = G_4(M^a); image score = (softmax(100 cos(Î_G, F))[a] + max M) / 2."""
    method = create_method("kanoclip", tiny_vv, PACK, memory_bank=False).prepare(CLASS)
    images = make_images(2, seed=8)
    features = tiny_vv(images)
    text = method.anchors.stacked()
    levels = [(CLIP_TEMPERATURE * F.normalize(e, dim=-1) @ text.T).softmax(-1)[..., 1].view(2, *features.grid)
              for e in features.patch_embeds]
    expected_map = gaussian_blur(upsample(torch.stack(levels).mean(0), (64, 64)), 4.0)
    image = method.adapter(features.image_embed)
    probability = (CLIP_TEMPERATURE * F.normalize(image, dim=-1) @ text.T).softmax(-1)[:, 1]
    scores = method.score(images)
    torch.testing.assert_close(scores.anomaly_map, expected_map, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores.image_score, (probability + expected_map.flatten(1).amax(1)) / 2, rtol=0, atol=1e-5)


# ---- what trains ---------------------------------------------------------------------------

def test_gradients_reach_only_the_contexts_bicmci_and_the_adapter(tiny_vv, defect_set):
    method = create_method("kanoclip", tiny_vv, PACK)
    for block in method.bicmci:
        _randomised(block)  # so that every weight of a block is on the gradient's path
    features = extract_features(tiny_vv, defect_set.images)
    batch = TrainBatch(features, defect_set.masks.float(), defect_set.labels, defect_set.class_names, (64, 64))
    parameters = method.stage_parameters("joint")
    for p in parameters:
        p.requires_grad_(True)
    method.stage_loss("joint", batch)["loss"].backward()
    trained = {key for key, p in method.named_parameters() if any(p is q for q in parameters)}
    assert {key.split(".")[0] for key in trained} == {"contexts", "bicmci", "adapter"}
    for key, p in method.named_parameters():
        if key in trained:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, key
        else:
            assert p.grad is None, key  # the frozen backbone, text tower included
    assert sum(p.numel() for p in parameters) == sum(v.numel() for v in method.trained_state().values())


@pytest.mark.parametrize("options, parts", [
    ({"bicmci": False, "conv_adapter": False}, {"contexts"}),
    ({"conv_adapter": False}, {"contexts", "bicmci"}),
    ({"bicmci": False}, {"contexts", "adapter"}),
])
def test_ablation_switches_drop_their_module(tiny_vv, options, parts):
    method = create_method("kanoclip", tiny_vv, PACK, **options)
    assert {key.split(".")[0] for key in method.trained_state()} == parts


def test_without_clip_vv_the_local_features_are_the_original_paths(tiny_vv, make_images):
    features = tiny_vv(make_images(1, seed=9))
    plain = create_method("kanoclip", tiny_vv, PACK, clip_vv=False).local_features(features)
    assert all(torch.allclose(p, tiny_vv.project(t)) for p, t in zip(plain, features.patch_tokens))
    local = create_method("kanoclip", tiny_vv, PACK).local_features(features)
    assert all(torch.equal(v, e) for v, e in zip(local, features.patch_embeds))
    assert not torch.allclose(plain[-1], local[-1], atol=1e-3)


def test_training_lowers_the_loss_and_is_deterministic(trained, tiny_vv, defect_set):
    method, history = trained
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    again = create_method("kanoclip", tiny_vv, PACK)
    fit(again, defect_set, CONFIG)
    assert all(torch.equal(v, again.trained_state()[k]) for k, v in method.trained_state().items())
    assert method._row_knowledge is None  # training's per-image cache is dropped


def test_local_loss_is_eq_15():
    """Focal(M^a, G) + Dice(M^a, G) + Dice(M^n, 1 - G) with M^n = 1 - M^a."""
    from linewatch.scoring.losses import dice_loss, focal_loss

    probability, mask = torch.rand(2, 8, 8), (torch.rand(2, 8, 8) > 0.7).float()
    expected = focal_loss(probability, mask) + dice_loss(probability, mask) + dice_loss(1 - probability, 1 - mask)
    torch.testing.assert_close(segmentation_loss(probability, mask), expected)


# ---- anchors and checkpoints ----------------------------------------------------------------

def test_the_anchor_key_changes_with_the_knowledge_pack_and_the_contexts(trained, tiny_vv, tmp_path):
    bundled = create_method("kanoclip", tiny_vv, PACK)
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(OWN_PACK))
    own = create_method("kanoclip", tiny_vv, PACK, knowledge=str(path))
    assert own.knowledge.digest != bundled.knowledge.digest
    assert own.anchor_key(CLASS) != bundled.anchor_key(CLASS)
    assert create_method("kanoclip", tiny_vv, PACK, knowledge=str(path)).anchor_key(CLASS) == own.anchor_key(CLASS)
    assert trained[0].anchor_key(CLASS) != bundled.anchor_key(CLASS)  # trained contexts
    torch.testing.assert_close(own.build_anchors(CLASS).stacked(), bundled.build_anchors(CLASS).stacked())  # same text


def test_checkpoint_round_trip_carries_the_knowledge_pack(trained, defect_set, tmp_path):
    method, _ = trained
    path = tmp_path / "k.safetensors"
    header = save_checkpoint(path, method, {"sigma": 4.0}, {"epochs": CONFIG.epochs})
    knowledge = header["options"]["knowledge"]
    assert knowledge["digest"] == method.knowledge.digest and knowledge["origin"] == "human-written"
    assert read_header(path) == header
    loaded = load_checkpoint(path, Backbone.build(BackboneConfig(arch=TINY_ARCH, vv_attention=True)))
    assert loaded.knowledge == method.knowledge and loaded.anchor_key(CLASS) == method.anchor_key(CLASS)
    images = defect_set.images[2:6]
    ours, theirs = method.prepare(CLASS).score(images), loaded.prepare(CLASS).score(images)
    assert torch.equal(ours.image_score, theirs.image_score) and torch.equal(ours.anomaly_map, theirs.anomaly_map)
    edited = {**knowledge, "pack": {**knowledge["pack"], "default": ["A changed sentence."]}}
    with pytest.raises(ValueError, match="does not match its content"):
        create_method("kanoclip", method.backbone, PACK, knowledge=edited)


def test_a_backbone_without_the_vv_path_is_refused(tiny, trained, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"kanoclip needs the backbone's V-V attention path \(CLIP-VV\): build it "
                                         r"with --vv-attention"):
        create_method("kanoclip", tiny)
    path = tmp_path / "k.safetensors"
    save_checkpoint(path, trained[0], {}, {})
    with pytest.raises(CheckpointError, match="V-V path True"):
        load_checkpoint(path, tiny)
    data = make_category(tmp_path, CLASS, seed=21)
    assert main(["eval", "--method", "kanoclip", "--data", str(data), "--arch", TINY_ARCH]) == 2
    assert "kanoclip needs the backbone's V-V attention path" in error_line(capsys)
    assert main(["bench", "--methods", "aprilgan,kanoclip", "--arch", TINY_ARCH, "--no-pipelines"]) == 2
    assert "kanoclip needs the backbone's V-V attention path" in error_line(capsys)


def test_presets_carry_the_papers_choices():
    from linewatch.scoring.preset import load_preset

    paper, _ = load_preset("kanoclip", "paper")
    assert (paper.backbone.arch, paper.backbone.image_size, paper.backbone.vv_attention) == ("ViT-L-14-336", 518, True)
    assert paper.options["context_words"] == 12 and paper.options["memory_bank"] is False
    assert (paper.training.stages["joint"].epochs, paper.training.stages["joint"].batch_size) == (15, 8)
    assert paper.training.optimizer.betas == (0.5, 0.999)
    cpu, _ = load_preset("kanoclip", "cpu")
    assert cpu.backbone.vv_attention is True and cpu.options["context_words"] == 12


def test_train_and_eval_with_the_cpu_preset_and_a_users_pack(tmp_path, capsys):
    data = make_category(tmp_path, CLASS, seed=22)
    pack = tmp_path / "pack.yaml"
    pack.write_text(yaml.safe_dump(OWN_PACK))
    out = tmp_path / "k.safetensors"
    assert main(["train", "--method", "kanoclip", "--data", str(data), "--arch", TINY_ARCH, "--epochs", "2",
                 "--shots", "2", "--views", "1", "--option", f"knowledge={pack}", "--out", str(out)]) == 0
    header = read_header(out)
    assert header["backbone"]["vv_attention"] is True and header["preset"]["name"] == "cpu"
    assert header["options"]["knowledge"]["origin"] == "mixed"
    assert header["options"]["knowledge"]["digest"] == KnowledgePack.load(pack).digest
    pack.unlink()  # the checkpoint carries the pack: it scores without the file
    capsys.readouterr()
    report = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["categories"][CLASS]["images"] == 6
    printed = capsys.readouterr().out.splitlines()[0]  # the pack is named by its digest, not printed whole
    assert f"knowledge=digest:{KnowledgePack.load(OWN_PACK).digest}" in printed and "A bent widget" not in printed


def test_the_pipeline_runs_a_kanoclip_checkpoint_and_refuses_it_without_vv(tmp_path, capsys):
    """`linewatch run --checkpoint` builds the V-V backbone the checkpoint names; the untrained
    method without --vv-attention is one error line, with it the run scores every frame."""
    from linewatch.synthetic.demo import write_demo_clip

    clip = write_demo_clip(tmp_path / "clip", seconds=1, fps=5, size=(160, 96), references=1)
    data = make_category(tmp_path / "data", CLASS, seed=23)
    checkpoint = tmp_path / "k.safetensors"
    assert main(["train", "--method", "kanoclip", "--data", str(data), "--arch", TINY_ARCH, "--epochs", "1",
                 "--shots", "2", "--views", "1", "--out", str(checkpoint)]) == 0
    out = tmp_path / "out"
    assert main(["run", str(clip.video), "--out", str(out), "--threshold", "0", "--checkpoint", str(checkpoint),
                 "--class", CLASS]) == 0, capsys.readouterr().err
    assert f"{clip.frame_count} frames scored" in capsys.readouterr().out
    tiny = ["--arch", TINY_ARCH, "--image-size", "64", "--method", "kanoclip"]
    assert main(["run", str(clip.video), "--out", str(tmp_path / "o2"), *tiny]) == 2
    assert "kanoclip needs the backbone's V-V attention path" in error_line(capsys)
    assert main(["run", str(clip.video), "--out", str(tmp_path / "o3"), *tiny, "--vv-attention"]) == 0
    assert f"{clip.frame_count} frames scored" in capsys.readouterr().out
