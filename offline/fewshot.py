"""The `linewatch train` job: few-shot sampling from MVTec-layout data, training (the loop is
``scoring.training.fit``) and the checkpoint.

``train`` (fit, then the checkpoint) is the one training path: ``linewatch train`` and the
study scripts (``scripts/context_table.py``) call it. A study that trains several methods or
variants on the same images may compute the augmented views and their frozen-backbone
features once (``prepare_views``, exactly what ``fit`` computes when given none) and pass
them in; nothing else of training is done outside ``fit``.

Sampling (MadCLIP's few-shot setting): per category, ``shots`` normal images from
train/good and ``shots`` anomalous images with masks from test/, taken round robin over the
defect types so each type is seen; fixed by the seed. The checkpoint records which test
images were used, and ``linewatch eval --checkpoint`` leaves them out, so evaluation runs on
the rest. ``--eval OTHER`` evaluates right after training, on the same dataset or on another
one: the cross-dataset protocol of AA-CLIP and APRIL-GAN (train on an auxiliary dataset,
test zero-shot on another).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from ..scoring.backbone import Backbone, BackboneConfig, VisualFeatures
from ..scoring.checkpoint import save_checkpoint
from ..scoring.methods import METHODS, check_options, create_method, method_class
from ..scoring.pixels import load_image
from ..scoring.prompts import PromptPack
from ..scoring.training import ProgressCallback, TrainConfig, TrainingSet, augment, extract_features, fit
from .datasets import Category, DatasetError, find_categories, load_mask


@dataclass
class TrainJob:
    method: str
    data: str
    out: str
    shots: int = 4
    train: TrainConfig = TrainConfig()
    backbone: BackboneConfig = BackboneConfig()
    prompts: str | None = None
    options: dict = field(default_factory=dict)
    device: str = "cpu"
    preset: dict | None = None  # scoring.preset.header_entry of the preset the settings came from


def sample_category(category: Category, shots: int, seed: int) -> tuple[list, list]:
    """(normal image paths, anomalous samples) for one category."""
    if shots > len(category.train_good):
        raise DatasetError(f"{category.name}: {shots} normal shots asked but train/good has {len(category.train_good)} images")
    rng = random.Random(seed)
    normal = rng.sample(category.train_good, shots)
    by_defect: dict[str, list] = {}
    for sample in category.test:
        if sample.label and sample.mask_path is not None:
            by_defect.setdefault(sample.defect, []).append(sample)
    if sum(map(len, by_defect.values())) < shots:
        raise DatasetError(f"{category.name}: {shots} anomalous shots asked but test/ has "
                           f"{sum(map(len, by_defect.values()))} defect images with masks")
    pools = [rng.sample(items, len(items)) for _, items in sorted(by_defect.items())]
    anomalous = []
    while len(anomalous) < shots:
        for pool in pools:
            if pool and len(anomalous) < shots:
                anomalous.append(pool.pop())
    return normal, anomalous


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_set(categories: list[Category], shots: int, seed: int, size: int) -> tuple[TrainingSet, list[dict]]:
    """The sampled images, and the test images used ({path, sha256}: eval leaves them out by content)."""
    images, masks, labels, names, used, subjects, known = [], [], [], [], [], [], []
    for category in categories:
        normal, anomalous = sample_category(category, shots, seed)
        for path, mask_path, label in [*((p, None, 0) for p in normal), *((s.path, s.mask_path, 1) for s in anomalous)]:
            images.append(load_image(path, size))
            masks.append(load_mask(mask_path, size))
            labels.append(label)
            names.append(category.name)
            subject = category.subject_mask(path)
            subjects.append(load_mask(subject, size))
            known.append(subject is not None)
            if label:
                used.append({"path": f"{category.name}/{path.relative_to(category.root).as_posix()}",
                             "sha256": file_digest(path)})
    with_subjects = any(known)
    return TrainingSet(torch.stack(images), torch.stack(masks), torch.tensor(labels), names,
                       torch.stack(subjects) if with_subjects else None,
                       torch.tensor(known) if with_subjects else None), used


def check_trainable(method: str) -> None:
    """A registered method with something to train, or one clear error naming the ones that have."""
    check_options(method, {})
    if not method_class(method).stages:
        trainable = sorted(name for name, cls in METHODS.items() if cls.stages)
        raise ValueError(f"{method} has nothing to train; trainable methods: {', '.join(trainable)}")


@dataclass(frozen=True, eq=False)
class PreparedViews:
    """A training set's augmented views and their frozen-backbone features, made once by
    ``prepare_views`` and passed to ``train`` for every method or variant trained on them."""
    source: TrainingSet  # the training set they were made from
    views: int  # TrainConfig.views and .seed they were made with
    seed: int
    backbone: str  # Backbone.identity
    data: TrainingSet  # the views (``views`` copies of every image)
    features: VisualFeatures


def prepare_views(backbone: Backbone, data: TrainingSet, config: TrainConfig) -> PreparedViews:
    """What ``fit`` computes first when it is given no features: ``config.views`` augmented
    views of ``data`` (augmentation seeded by ``config.seed``) and their frozen features."""
    views = augment(data, config.views, torch.Generator().manual_seed(config.seed))
    return PreparedViews(data, config.views, config.seed, backbone.identity, views,
                         extract_features(backbone, views.images))


def train(job: TrainJob, method, data: TrainingSet, used: list[dict], categories: list[str],
          prepared: PreparedViews | None = None, progress: ProgressCallback | None = None) -> tuple[list[dict], dict]:
    """The one training path: ``fit`` ``method`` on ``data`` with ``job.train`` (all its stages in
    one call), then write the checkpoint to ``job.out``. Returns (per-epoch losses, header).
    ``prepared``: ``data``'s views and features from ``prepare_views``, made with this
    backbone and this config's views and seed (checked: other ones would train on other images)."""
    if prepared is not None:
        made = (prepared.views, prepared.seed, prepared.backbone)
        wanted = (job.train.views, job.train.seed, method.backbone.identity)
        if prepared.source is not data or made != wanted:
            raise ValueError(f"prepared views (views, seed, backbone) {made} were not made from this training set "
                             f"with {wanted}: make them with prepare_views(backbone, data, config)")
    started = time.monotonic()
    history = fit(method, prepared.data if prepared else data, job.train,
                  features=prepared.features if prepared else None, progress=progress)
    header = save_checkpoint(job.out, method, job.options, preset=job.preset, training={
        **asdict(job.train), "shots": job.shots, "data": job.data, "categories": categories,
        "test_images_used": used,
        "final_loss": {k: v for k, v in history[-1].items() if k not in ("stage", "epoch", "lr")},
        "seconds": round(time.monotonic() - started, 1)})
    return history, header


def run_training(job: TrainJob) -> tuple[object, dict]:
    """Train and save; returns (trained method, checkpoint header)."""
    if job.shots < 1:
        raise ValueError("--shots must be at least 1 (k normal and k anomalous images per category)")
    check_trainable(job.method)
    check_options(job.method, job.options)
    categories = find_categories(job.data)
    for category in categories:
        sample_category(category, job.shots, job.train.seed)  # fail on too few images before building the model
    prompts = PromptPack.load(job.prompts)
    backbone = Backbone.build(job.backbone, job.device)
    method = create_method(job.method, backbone, prompts, **job.options)
    data, used = training_set(categories, job.shots, job.train.seed, backbone.image_size)
    subjects = 0 if data.subject_known is None else int(data.subject_known.sum())
    print(f"training {job.method} on {len(data.labels)} images ({job.shots} normal + {job.shots} anomalous per category, "
          f"{len(categories)} categor{'y' if len(categories) == 1 else 'ies'}), {job.train.views} views each, "
          f"{subjects} with a subject mask{' (used: ' + ', '.join(method.training_views) + ' views)' if subjects and method.training_views else ''}, "
          f"{backbone.identity} at {backbone.image_size} px"
          + (f", preset {job.preset['name']} ({job.preset['file']})" if job.preset else ""))
    bar = tqdm(total=job.train.total_epochs(method.stages), unit="epoch", desc="train")

    def progress(stage, epoch, step, steps, losses):
        bar.set_postfix_str(f"{stage} loss {losses['loss']:.4f}", refresh=False)
        if step == steps - 1:
            bar.update(1)

    history, header = train(job, method, data, used, [c.name for c in categories], progress=progress)
    bar.close()
    print(f"checkpoint written to {job.out} ({header['identity']}), last epoch loss {history[-1]['loss']:.4f}, "
          f"{header['training']['seconds']} s")
    return method, header
