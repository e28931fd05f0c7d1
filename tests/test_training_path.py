"""One training path (issue 24 item 3): ``linewatch train`` and the study scripts train through
``offline.fewshot.train`` (one ``fit`` over every stage, then the checkpoint); views and features
prepared once give the same checkpoint as ``fit`` computing them itself."""

from __future__ import annotations

from dataclasses import replace

import pytest

from linewatch.offline.datasets import find_categories
from linewatch.offline.fewshot import TrainJob, prepare_views, run_training, train, training_set
from linewatch.scoring.backbone import TINY_ARCH, BackboneConfig
from linewatch.scoring.checkpoint import read_header
from linewatch.scoring.methods import create_method
from linewatch.scoring.preset import load_preset, train_config
from linewatch.synthetic.context_set import write_context_set


@pytest.fixture(scope="module")
def context_set(tmp_path_factory):
    return write_context_set(tmp_path_factory.mktemp("ctx"), seed=3, train=3, per_type=2).root.parent


def _job(root, out, views=1) -> TrainJob:
    preset, _ = load_preset("core-clip", "cpu")
    config = train_config(preset, seed=0, views=views)  # both stages, 2 epochs of 2 steps: seconds on the tiny model
    config = replace(config, stages={name: replace(s, epochs=2, batch_size=2) for name, s in config.stages.items()})
    return TrainJob(method="core-clip", data=str(root), out=str(out), shots=2, train=config,
                    backbone=BackboneConfig(arch=TINY_ARCH), options=dict(preset.options))


def test_prepared_views_train_the_checkpoint_linewatch_train_writes(tiny, context_set, tmp_path):
    """core-clip (two stages, masked subject/context views): the study path (views prepared once,
    passed in) and linewatch train's (fit computes them) write the same tensors; the shortcut
    the context table used before (the text stage apart, the image stage fit on its own) does not."""
    job = _job(context_set, tmp_path / "train.safetensors")
    _, header = run_training(job)
    categories = find_categories(job.data)
    data, used = training_set(categories, job.shots, job.train.seed, tiny.image_size)
    prepared = prepare_views(tiny, data, job.train)
    study = replace(job, out=str(tmp_path / "study.safetensors"))
    _, study_header = train(study, create_method("core-clip", tiny, **job.options), data, used,
                            [c.name for c in categories], prepared)
    assert study_header["identity"] == header["identity"] == read_header(study.out)["identity"]
    assert study_header["training"]["test_images_used"] == header["training"]["test_images_used"]

    from linewatch.scoring.training import fit

    split = create_method("core-clip", tiny, **job.options)  # the old shortcut: a stage per fit call
    for stage in split.stages:
        split.stages = (stage,)
        fit(split, prepared.data, job.train, features=prepared.features)
    del split.stages
    from linewatch.scoring.training import state_digest

    assert state_digest(split.trained_state()) != header["identity"]  # the image stage's batches come in another order


def test_views_prepared_for_other_settings_are_refused(tiny, context_set, tmp_path):
    job = _job(context_set, tmp_path / "x.safetensors", views=2)
    data, used = training_set(find_categories(job.data), job.shots, 0, tiny.image_size)
    wrong_count = prepare_views(tiny, data, replace(job.train, views=1))
    other_data, _ = training_set(find_categories(job.data), job.shots, 0, tiny.image_size)
    for prepared, source in ((wrong_count, data), (prepare_views(tiny, other_data, job.train), data)):
        with pytest.raises(ValueError, match="prepared views"):
            train(job, create_method("core-clip", tiny, **job.options), source, used, ["powerline_context"], prepared)
