"""Few-shot training on the frozen tiny backbone: stage losses, fit, checkpoints and `linewatch train`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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
from linewatch.scoring.methods import METHODS, create_method
from linewatch.scoring.methods.aaclip import abnormal_cosine_score
from linewatch.scoring.methods.base import CLIP_TEMPERATURE, gaussian_blur, upsample
from linewatch.scoring.methods.madclip import abnormal_map, dual_scores, placement_order
from linewatch.scoring.preset import bundled_folder
from linewatch.scoring.prompts import PromptPack, TextAnchors
from linewatch.scoring.training import (
    TrainBatch,
    TrainConfig,
    TrainingSet,
    extract_features,
    fit,
)

from helpers import defect_training_set, make_category

TRAINABLE = ["aprilgan", "aa-clip", "madclip", "core-clip"]
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
    """4 normal and 4 defective 64 px images (``helpers.defect_training_set``)."""
    return defect_training_set(CLASS)


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
                assert p.grad.abs().sum() > 0, key
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


def test_aaclip_detection_score_is_the_abnormal_cosine_alone():
    """(cos(det, T_A) + 1) / 2, as the authors' test.py: det (2, 0) and (0, 1) against
    T_A = (0.6, 0.8) have cosines 0.6 and 0.8, so 0.8 and 0.9 whatever T_N is (the softmax
    over (T_N, T_A) it replaces gave ~1 and ~0 here for T_N = (1, 0))."""
    det = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    for normal in ([0.0, 1.0], [1.0, 0.0]):
        anchors = torch.tensor([normal, [0.6, 0.8]])
        torch.testing.assert_close(abnormal_cosine_score(det, anchors), torch.tensor([0.8, 0.9]))


def test_aaclip_image_score_mixes_the_abnormal_cosine_with_the_map(trained, defect_set):
    """image score = 0.5 (cos(det, T_A) + 1) / 2 + 0.5 max(map); swapping T_N moves the map only."""
    method, _ = trained("aa-clip")
    method.sigma = 0.0  # the map as scored, unsmoothed (restored below; the fixture is shared)
    try:
        method.prepare(CLASS)
        features = method.backbone(defect_set.images[2:6])
        anchors = method.anchors
        _, det = method.image_outputs(features, anchors.stacked())
        expected = 0.5 * abnormal_cosine_score(det, anchors.stacked())
        for normal in (anchors.normal, F.normalize(anchors.normal + anchors.abnormal, dim=0)):
            method.anchors = TextAnchors(normal, anchors.abnormal, anchors.key)
            scores = method.score_features(features, (64, 64))
            torch.testing.assert_close(scores.image_score - 0.5 * scores.anomaly_map.flatten(1).amax(1), expected)
    finally:
        method.sigma = 4.0


def test_madclip_dual_scores_and_image_probability():
    """S_n = O_n.t_n - O_n.t_ab, S_ab = O_ab.t_ab - O_ab.t_n, no temperature: O_n = (1, 0),
    O_ab = (0, 1), t_n = (1, 0), t_ab = (0.6, 0.8) give S = (1 - 0.6, 0.8 - 0) = (0.4, 0.8), and
    the abnormal probability softmax(S)[ab] = sigmoid(0.4) = 0.5987."""
    scores = dual_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    torch.testing.assert_close(scores, torch.tensor([[0.4, 0.8]]))
    torch.testing.assert_close(scores.softmax(-1)[:, 1], torch.tensor([0.598688]), rtol=0, atol=1e-6)


def test_madclip_map_interpolates_scores_before_the_softmax():
    """M = SoftMax(Interpolate(S)): patches S_ab - S_n = 0 and 2 on a 1 x 2 grid, upsampled to
    1 x 4 (bilinear, half-pixel centres: weights 1, 3/4 1/4, 1/4 3/4, 1) are 0, 0.5, 1.5, 2, so the
    map is their sigmoids 0.5, 0.6225, 0.8176, 0.8808 (softmax first would give 0.5952, 0.7856 inside)."""
    scores = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])  # [B, N, 2]
    expected = torch.sigmoid(torch.tensor([[[0.0, 0.5, 1.5, 2.0]]]))
    torch.testing.assert_close(abnormal_map(scores, (1, 2), (1, 4)), expected)
    torch.testing.assert_close(expected, torch.tensor([[[0.5, 0.622459, 0.817574, 0.880797]]]), rtol=0, atol=1e-6)


def test_madclip_prompts_own_a_context_per_synonym_and_placement(tiny):
    """Each shared synonym and each placement (context after, before, around the phrase) has its
    own context vectors; a class's extra phrases share one more row (unused by a class without)."""
    pack = PromptPack.model_validate({**PACK.model_dump(), "classes": {"gadget": {"abnormal": ["dented {}"]}}})
    method = create_method("madclip", tiny, pack)
    assert method.text["abnormal"].shape == (2 + 1, 3, method.context_words, tiny.clip.transformer.width)
    for class_name, used in ((CLASS, [True, True, False]), ("gadget", [True, True, True])):
        context = method.text["abnormal"].detach().clone().requires_grad_(True)
        method.text["abnormal"] = torch.nn.Parameter(context)
        method.encode_prompts(class_name, "abnormal").sum().backward()
        reached = method.text["abnormal"].grad.abs().sum(dim=(-1, -2)) > 0  # [row, placement]
        assert reached.tolist() == [[u] * 3 for u in used], class_name
        method.text["abnormal"].requires_grad_(False)
    assert placement_order("end", 4, 2, 9).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert placement_order("front", 4, 2, 9).tolist() == [0, 5, 6, 1, 2, 3, 4, 7, 8]
    assert placement_order("middle", 4, 2, 9).tolist() == [0, 1, 2, 5, 6, 3, 4, 7, 8]


# ---- fit ----------------------------------------------------------------------------------

# MadCLIP's scores are cosine differences without a temperature, bounded by |t_n - t_ab|, which
# starts near 0 with random text weights: SigLIP and dice sit near their chance values until the
# prompts move apart, so its loss falls more slowly than the others' (9 % in these 8 epochs).
# CoRe-CLIP's text stage at its default weights (orthogonality 0.1, AA-CLIP's) pulls t0 and t1
# apart from a cosine near 1 on random text weights: its loss falls 3 % in these 8 epochs.
MARGIN = {"madclip": 0.95, "core-clip": 0.98}


def test_training_loss_decreases(name, trained):
    method, history = trained(name)
    assert [h["stage"] for h in history] == [s for s in method.stages for _ in range(CONFIG.epochs)]
    for stage in method.stages:
        losses = [h["loss"] for h in history if h["stage"] == stage]
        assert all(np.isfinite(losses))
        assert losses[-1] < MARGIN.get(name, 0.9) * losses[0], (stage, losses)  # by a margin, not by rounding noise


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


def test_siglip_loss_is_the_authors_per_patch_form():
    """Hand-computed: a normal image (signs +1 on S_n, -1 on S_ab) with two patches,
    S = (0, 0) and (ln 3, -ln 3). log sigmoid(0) = -ln 2, log sigmoid(ln 3) = ln 3/4; per column
    the patch mean is (-ln 2 + ln 3/4) / 2, and the two columns sum to ln 3/8: loss ln 8/3."""
    ln3 = float(np.log(3.0))
    scores = torch.tensor([[[0.0, 0.0], [ln3, -ln3]]])
    torch.testing.assert_close(siglip_loss(scores, torch.tensor([0])), torch.tensor(np.log(8 / 3), dtype=torch.float32))
    # The same scores on an anomalous image are wrong twice over: signs flip, log sigmoid(-ln 3) = ln 1/4.
    torch.testing.assert_close(siglip_loss(scores, torch.tensor([1])), torch.tensor(np.log(8 / 1), dtype=torch.float32))
    # A batch is the mean of its images.
    both = siglip_loss(scores.repeat(2, 1, 1), torch.tensor([0, 1]))
    torch.testing.assert_close(both, torch.tensor((np.log(8 / 3) + np.log(8)) / 2, dtype=torch.float32))


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
    assert header["preset"]["name"] == "cpu" and header["method_version"] == 2  # the default preset
    assert header["training"]["stages"]["text"]["epochs"] == 2 and header["training"]["views"] == 2  # flags win
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


def test_train_with_the_paper_preset_records_it(tmp_path, capsys):
    """The paper preset's schedule runs as written (here on the tiny architecture, which drops the
    preset's ViT-L weights, size and layers); flags given win; the header records the preset."""
    data = make_category(tmp_path, "widget", seed=13)
    out = tmp_path / "paper.safetensors"
    assert main(["train", "--method", "aa-clip", "--preset", "paper", "--data", str(data), "--arch", TINY_ARCH,
                 "--out", str(out), "--option", "prompt_sample=8"]) == 0
    assert "preset paper (bundled:aa-clip/paper.json)" in capsys.readouterr().out
    header = read_header(out)
    training = header["training"]
    assert header["preset"]["name"] == "paper" and header["preset"]["file"] == "bundled:aa-clip/paper.json"
    assert header["backbone"]["vv_attention"] is True and header["backbone"]["arch"] == TINY_ARCH
    assert header["options"] == {"text_layers": 3, "adapt_weight": 0.1, "orthogonal_weight": 0.1, "prompt_sample": 8,
                                 "sigma": 14, "memory_bank": False}
    assert training["betas"] == [0.5, 0.999] and training["shots"] == 2 and training["views"] == 1
    assert training["stages"]["text"] == {"epochs": 5, "batch_size": 16, "lr": 1e-5, "lr_milestones": [],
                                          "lr_gamma": 1.0}
    assert training["stages"]["image"] == {"epochs": 20, "batch_size": 2, "lr": 5e-4,
                                           "lr_milestones": [16000, 32000], "lr_gamma": 0.5}
    # Without a memory bank the checkpoint scores zero-shot only, and says why when given references.
    assert main(["eval", "--checkpoint", str(out), "--data", str(data), "--shots", "2"]) == 2
    assert "without a memory bank" in capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [
    ("madclip", {"views": 11, "betas": [0.5, 0.999], "adapters": {"epochs": 2, "batch_size": 16, "lr": 1e-3}}),
    ("aprilgan", {"views": 1, "betas": [0.5, 0.999], "projections": {"epochs": 2, "batch_size": 64, "lr": 1e-3}}),
    ("kanoclip", {"views": 1, "betas": [0.5, 0.999], "joint": {"epochs": 2, "batch_size": 8, "lr": 1e-3}}),
])
def test_the_other_paper_presets_run_here(name, expected, tmp_path):
    data = make_category(tmp_path, "widget", seed=15)
    out = tmp_path / f"{name}.safetensors"
    assert main(["train", "--method", name, "--preset", "paper", "--data", str(data), "--arch", TINY_ARCH,
                 "--shots", "2", "--epochs", "2", "--out", str(out)]) == 0
    header = read_header(out)
    training = header["training"]
    (stage,) = [k for k in expected if k not in ("views", "betas")]
    assert header["preset"]["name"] == "paper" and training["views"] == expected["views"]
    assert training["betas"] == expected["betas"]
    assert {k: training["stages"][stage][k] for k in ("epochs", "batch_size", "lr")} == expected[stage]


def test_train_with_a_preset_file_that_names_its_method(tmp_path, capsys):
    data = make_category(tmp_path, "widget", seed=14)
    preset = json.loads((bundled_folder("madclip") / "cpu.json").read_text())
    preset["name"], preset["training"]["stages"]["adapters"]["epochs"] = "short", 1
    file = tmp_path / "short.json"
    file.write_text(json.dumps(preset))
    out = tmp_path / "m.safetensors"
    assert main(["train", "--preset", str(file), "--data", str(data), "--arch", TINY_ARCH, "--shots", "2",
                 "--views", "2", "--out", str(out)]) == 0
    header = read_header(out)
    assert header["method"] == "madclip" and header["preset"]["file"] == str(file)
    assert header["training"]["stages"]["adapters"]["epochs"] == 1 and header["training"]["views"] == 2
    assert main(["train", "--method", "aa-clip", "--preset", str(file), "--data", str(data), "--arch", TINY_ARCH,
                 "--out", str(out)]) == 2
    assert "is for madclip, not --method aa-clip" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--method", "winclip"], "winclip has nothing to train; trainable methods: "
                              + ", ".join(sorted(name for name, cls in METHODS.items() if cls.stages))),
    (["--shots", "5"], "widget: 5 normal shots asked but train/good has 4 images"),
    (["--out", "{tmp}/x.pt"], "checkpoints are safetensors files"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--preset", "gpu"], "aprilgan has no preset 'gpu'; bundled: cpu, paper"),
    (["--method", "winclip", "--preset", "paper"], "winclip has nothing to train"),
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
