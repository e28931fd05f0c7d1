"""Training presets as data: the bundled files, the schema's refusals, how flags override a
preset, the schedule reaching the optimiser, and the checkpoint's record of its preset."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from linewatch.cli import main
from linewatch.scoring.backbone import TINY_ARCH
from linewatch.scoring.checkpoint import CheckpointError, load_checkpoint, read_header, save_checkpoint
from linewatch.scoring.methods import METHODS, create_method
from linewatch.scoring.preset import (
    backbone_config,
    bundled,
    bundled_folder,
    header_entry,
    load_preset,
    train_config,
)
from linewatch.scoring.training import StageSchedule, TrainConfig, TrainingSet, fit, optimizer_for

TRAINED = sorted(name for name, cls in METHODS.items() if cls.stages)


def test_every_trained_method_ships_a_valid_paper_and_cpu_preset():
    shipped = bundled()
    for name in TRAINED:
        assert {"paper", "cpu"} <= set(shipped.get(name, [])), name
        for preset_name in shipped[name]:
            preset, path = load_preset(name, preset_name)  # validates: options, stages, every value cited
            assert (preset.method, preset.name) == (name, preset_name)
            assert path == bundled_folder(name) / f"{preset_name}.json"  # in the method's own folder
    assert set(shipped) <= set(METHODS)


def test_paper_presets_carry_the_papers_choices():
    aa, _ = load_preset("aa-clip", "paper")
    assert (aa.backbone.arch, aa.backbone.image_size, aa.backbone.vv_attention) == ("ViT-L-14-336", 518, True)
    assert aa.training.optimizer.betas == (0.5, 0.999)
    assert {k: (s.epochs, s.batch_size) for k, s in aa.training.stages.items()} == {"text": (5, 16), "image": (20, 2)}
    assert aa.training.stages["image"].lr_milestones == (16000, 32000) and aa.options["memory_bank"] is False
    mad, _ = load_preset("madclip", "paper")
    assert (mad.backbone.image_size, mad.training.stages["adapters"].epochs, mad.training.stages["adapters"].batch_size,
            mad.training.shots, mad.options["memory_bank"]) == (238, 60, 16, 16, False)


def _write(tmp_path, **changes):
    preset = json.loads((bundled_folder("madclip") / "cpu.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = preset
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    ({"options": {"context_words": 8, "blur": 2}}, "madclip has no option blur"),
    ({"training__stages": {"text": {"epochs": 1, "batch_size": 1, "lr": 0.1}}}, "must name the stages of madclip"),
    ({"source__training.views": None}, "missing: training.views"),
    ({"source__training.augment": "made up"}, "fields this preset does not have: training.augment"),
    ({"training__optimizer": {"betas": [0.5, 1.5]}}, "betas must lie in [0, 1)"),
    ({"training__optimizer": {"name": "sgd"}}, "training.optimizer.name: Input should be 'adam' or 'adamw'"),
    ({"backbone__image_sise": 224}, "backbone.image_sise: Extra inputs are not permitted"),
    ({"training__stages": {"adapters": {"epochs": 0, "batch_size": 8, "lr": 0.001}}}, "epochs"),
], ids=["option", "stages", "uncited", "stale-source", "betas", "optimizer", "typo", "epochs"])
def test_invalid_presets_are_refused_with_the_reason(tmp_path, changes, message):
    with pytest.raises(ValueError, match="is invalid") as info:
        load_preset(None, _write(tmp_path, **changes))
    assert message in str(info.value)


def test_preset_lookup_mistakes(tmp_path):
    with pytest.raises(ValueError, match=r"aa-clip has no preset 'gpu'; bundled: cpu, paper"):
        load_preset("aa-clip", "gpu")
    with pytest.raises(ValueError, match="preset file not found"):
        load_preset("aa-clip", str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="is for madclip, not --method aa-clip"):
        load_preset("aa-clip", _write(tmp_path))


def test_flags_override_the_preset():
    preset, _ = load_preset("aa-clip", "paper")
    config = train_config(preset, seed=3, epochs=2, batch_size=4)
    assert {k: (s.epochs, s.batch_size, s.lr) for k, s in config.stages.items()} == {"text": (2, 4, 1e-5),
                                                                                    "image": (2, 4, 5e-4)}
    assert config.betas == (0.5, 0.999) and config.optimizer == "adam" and config.views == 1 and config.seed == 3
    assert config.stages["image"].lr_milestones == (16000, 32000)
    assert train_config(preset, lr=1e-3).stages["text"].lr == 1e-3
    # The preset's backbone, the given fields on top; another arch takes its own size, layers and weights.
    assert backbone_config(preset, {"seed": 1}).weights == "openai"
    other = backbone_config(preset, {"arch": TINY_ARCH, "weights": None})
    assert (other.arch, other.weights, other.image_size, other.layers, other.vv_attention) == (TINY_ARCH, "none", None,
                                                                                               None, True)
    assert backbone_config(preset, {"arch": TINY_ARCH, "layers": (2, 4), "vv_attention": False}).layers == (2, 4)


def test_stage_schedule_reaches_the_optimiser(tiny):
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer, scheduler = optimizer_for([parameter], StageSchedule(lr=0.1, lr_milestones=(2, 3), lr_gamma=0.5), 1e-3,
                                         TrainConfig(betas=(0.5, 0.999)))
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.999) and optimizer.param_groups[0]["weight_decay"] == 0
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.1, 0.05, 0.025, 0.025])


def test_fit_runs_each_stage_on_its_own_schedule(tiny, make_images):
    """AA-CLIP's two stages with their own epochs, batch sizes and step schedule, as the paper
    preset sets them (here shortened): the history shows the epochs and the rate after each."""
    data = TrainingSet(make_images(4), torch.zeros(4, 64, 64, dtype=torch.bool), torch.tensor([0, 0, 1, 1]), ["w"] * 4)
    data.masks[2:, 8:24, 8:24] = True
    steps = []
    config = TrainConfig(views=1, betas=(0.5, 0.999), stages={
        "text": StageSchedule(epochs=1, batch_size=4, lr=1e-5),
        "image": StageSchedule(epochs=3, batch_size=2, lr=5e-4, lr_milestones=(4,), lr_gamma=0.5)})
    history = fit(create_method("aa-clip", tiny), data, config,
                  progress=lambda stage, epoch, step, total, losses: steps.append((stage, total)))
    assert [(h["stage"], h["epoch"]) for h in history] == [("text", 0), ("image", 0), ("image", 1), ("image", 2)]
    assert sorted(set(steps)) == [("image", 2), ("text", 1)]  # steps per epoch from each stage's batch size
    assert [h["lr"] for h in history] == pytest.approx([1e-5, 5e-4, 2.5e-4, 2.5e-4])  # halved after step 4


def test_methods_lists_the_presets(capsys):
    assert main(["methods", "--presets"]) == 0
    out = capsys.readouterr().out
    for name in TRAINED:
        assert f"{name} " in out
    assert out.count("--preset paper") == len(TRAINED) and out.count("--preset cpu") == len(TRAINED)
    assert "ViT-L-14-336@openai 518 px, layers 6,12,18,24, V-V; text 5 ep, batch 16" in out


def _without_version(path, tmp_path):
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["linewatch"])
    del header["method_version"], header["preset"]  # as checkpoints were written before this change
    old = tmp_path / f"old-{path.name}"
    save_file(load_file(str(path)), str(old), metadata={"linewatch": json.dumps(header)})
    return old


@pytest.mark.parametrize("name", ["aa-clip", "madclip"])
def test_checkpoints_of_the_old_forms_are_refused_clearly(name, tiny, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    preset, preset_file = load_preset(name, "cpu")
    header = save_checkpoint(path, create_method(name, tiny), {}, {}, preset=header_entry(preset, preset_file))
    assert header["method_version"] == 2
    assert header["preset"] == {"name": "cpu", "file": f"bundled:{name}/cpu.json", "digest": preset.digest}
    with pytest.raises(CheckpointError, match=rf"holds a {name} of form v1; this linewatch scores v2 \(v2 follows the "
                                              rf"authors' code.*Retrain it: linewatch train --method {name}"):
        read_header(_without_version(path, tmp_path))


def test_an_aprilgan_checkpoint_from_before_presets_still_loads(tiny, tmp_path):
    path = tmp_path / "aprilgan.safetensors"
    save_checkpoint(path, create_method("aprilgan", tiny), {}, {})
    assert load_checkpoint(_without_version(path, tmp_path), tiny).name == "aprilgan"


@pytest.mark.parametrize("name", ["aa-clip", "madclip"])
def test_without_a_memory_bank_references_are_refused(name, tiny, make_images):
    method = create_method(name, tiny, memory_bank=False)
    with pytest.raises(ValueError, match="without a memory bank .* takes no reference images"):
        method.prepare("widget", make_images(2))
    assert method.anchors is None
    method.prepare("widget")  # zero-shot is fine
