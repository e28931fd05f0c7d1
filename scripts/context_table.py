"""The context-anomaly table: CoRe-CLIP against appearance-only scorers on the generated
context set (``linewatch demo OUT --context-set``), with its ablations.

Per shot count k (k normal + k anomalous training images, sampled as ``linewatch train``),
scored on the rest of the test split:
  aprilgan        untrained (zero-shot), few-shot memory (the k normal shots as references),
                  trained (the preset)
  core-clip       untrained (row "core-clip untrained"), trained (the preset); ablations
                  trained the same way: global branch only (branches=[global]) and plain
                  averaging (fusion=mean)
  winclip         zero-shot and few-shot (WinCLIP+, the k normal shots) on a small subset of
                  the test split only: its window passes cost seconds per image on a CPU.
                  Every other row is reported on that subset too.

Every trained row goes through ``linewatch.offline.fewshot.train``, the training path of
``linewatch train``: one ``fit`` over all the method's stages, then the checkpoint, which is
loaded again and scored (as ``linewatch eval --checkpoint``). Rows share only what ``fit``
would compute the same way for each of them: the augmented training views and their frozen
features (``prepare_views``, once per view count) and the test images' features (once for
the whole table). A row's checkpoint is the one ``linewatch train`` writes with the same
preset, options, shots and seed (docs/methods/core-clip.md, "Two training paths, reconciled").
Checkpoints land in OUT.

    OMP_NUM_THREADS=1 python scripts/context_table.py --data runs/ctxset --shots 8 \
        --out runs/context-table --features-cache runs/features --subset 24
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from fewshot_table import cached_features, evaluate, test_set
from tqdm import tqdm

from linewatch.offline.datasets import find_categories
from linewatch.offline.fewshot import TrainJob, prepare_views, sample_category, train, training_set
from linewatch.scoring.backbone import Backbone, VisualFeatures
from linewatch.scoring.checkpoint import load_checkpoint
from linewatch.scoring.methods import create_method, method_class
from linewatch.scoring.metrics import image_metrics, pixel_metrics
from linewatch.scoring.preset import backbone_config, header_entry, load_preset, train_config

VARIANTS = {"core-clip": {}, "core-clip global only": {"branches": ["global"]},
            "core-clip plain averaging": {"fusion": "mean"}}
RUNS = ["aprilgan", "core-clip untrained", *VARIANTS, "winclip"]
TRAINED = ("aprilgan", "core-clip")


def subset_of(keys, labels, exclude: set[str], size: int, seed: int) -> list[int]:
    """``size`` test images outside ``exclude``: half normal, half anomalous, fixed by seed."""
    rng = random.Random(seed)
    normal = [i for i, k in enumerate(keys) if labels[i] == 0 and k not in exclude]
    anomalous = [i for i, k in enumerate(keys) if labels[i] == 1 and k not in exclude]
    return sorted(rng.sample(normal, size // 2) + rng.sample(anomalous, size - size // 2))


def evaluate_images(method, images, masks, labels, class_name, references=None, batch=4, anchors=None) -> dict:
    """Metrics of a method scored on raw images (WinCLIP's windows need the ViT per window)."""
    method.prepare(class_name, references, anchors=anchors)
    scores, maps = [], []
    for chunk in tqdm(images.split(batch), desc=f"{method.name} images", leave=False):
        result = method.score(chunk)
        scores.append(result.image_score.float().cpu())
        maps.append(result.anomaly_map.float().cpu())
    row = {"images": len(labels), **image_metrics(labels, torch.cat(scores).numpy()),
           **pixel_metrics(masks, torch.cat(maps).numpy())}
    return {k: row[k] for k in ("images", "image_auroc", "pixel_auroc", "aupro")}


@dataclass
class TestSplit:
    """The test images with their cached features, the fixed subset, and text anchors by key
    (backbone, sentences, trained text parts: ``anchor_key``, which ``prepare`` checks), so rows
    with the same text encode the class's sentences once."""
    category: str
    size: int
    keys: list[str]
    classes: list[str]
    images: torch.Tensor
    masks: np.ndarray
    labels: np.ndarray
    features: VisualFeatures
    subset: list[int] = field(default_factory=list)
    anchors: dict = field(default_factory=dict)

    def score(self, method, exclude: set[str], references: torch.Tensor | None = None) -> dict:
        """Metrics on the images not in ``exclude`` ("rest") and on the subset."""
        refs = None if references is None else {self.category: references}
        key = method.anchor_key(self.category)
        cached = {self.category: self.anchors[key]} if key in self.anchors else None
        common = (self.features, self.keys, self.classes, self.masks, self.labels)
        rest = evaluate(method, *common, exclude, self.size, refs, cached)
        self.anchors[key] = method.anchors
        not_subset = set(self.keys) - {self.keys[i] for i in self.subset}
        return {"rest": rest, "subset": evaluate(method, *common, not_subset, self.size, refs,
                                                 {self.category: self.anchors[key]})}


def stage_epochs_of(items: list[str], parser: argparse.ArgumentParser) -> dict[str, int]:
    known = {stage for name in TRAINED for stage in method_class(name).stages}
    epochs = {}
    for item in items:
        stage, _, n = item.partition("=")
        if stage not in known or not n.isdigit() or int(n) < 1:
            parser.error(f"--stage-epochs takes STAGE=N with N >= 1 and STAGE one of {', '.join(sorted(known))}, "
                         f"got {item!r}")
        epochs[stage] = int(n)
    return epochs


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the generated set (linewatch demo OUT --context-set)")
    parser.add_argument("--shots", nargs="+", type=int, default=[8])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", type=int, default=None, help="default: the preset's")
    parser.add_argument("--epochs", type=int, default=None, help="every stage's epochs (default: the preset's)")
    parser.add_argument("--stage-epochs", nargs="+", default=[], metavar="STAGE=N",
                        help="one stage's epochs, e.g. image=15 (core-clip's image stage; other methods' stages "
                             "keep theirs)")
    parser.add_argument("--subset", type=int, default=24, help="test images WinCLIP is scored on (and every row again)")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS,
                        help="which rows (default all; a table can be made in parts, each with its own OUT)")
    parser.add_argument("--out", default="runs/context-table")
    parser.add_argument("--features-cache", default=None)
    args = parser.parse_args()
    return args, stage_epochs_of(args.stage_epochs, parser)


def main() -> None:
    args, stage_epochs = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    categories = find_categories(args.data)
    (category,) = categories
    presets = {name: load_preset(name, args.preset) for name in TRAINED}
    specs = {backbone_config(preset, {"seed": args.seed}) for preset, _ in presets.values()}
    if len(specs) != 1:
        raise SystemExit(f"the {args.preset} presets of core-clip and aprilgan name different backbones: {specs}")
    backbone = Backbone.build(specs.pop())
    size = backbone.image_size
    keys, classes, images, masks, labels = test_set(args.data, size)
    features = cached_features(backbone, images, args.data, Path(args.features_cache) if args.features_cache else None,
                               "test features")
    test = TestSplit(category.name, size, keys, classes, images, masks, labels, features)
    used_any = set()
    for shots in args.shots:
        _, anomalous = sample_category(category, shots, args.seed)
        used_any |= {f"{category.name}/{s.path.relative_to(category.root).as_posix()}" for s in anomalous}
    test.subset = subset_of(keys, labels, used_any, args.subset, args.seed)
    print(f"backbone {backbone.identity} at {size} px, layers {backbone.layers}; {len(keys)} test images, "
          f"subset {len(test.subset)}; features after {time.monotonic() - started:.0f} s")

    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row))
        (out / "table.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))

    for shots in args.shots:
        data, used = training_set(categories, shots, args.seed, size)
        exclude = {u["path"] for u in used}
        normal_shots = data.images[data.labels == 0]
        prepared = {}  # views per image -> prepare_views: what fit computes first, made once per view count

        def trained(label: str, name: str, extra: dict) -> dict:
            preset, preset_file = presets[name]
            config = train_config(preset, seed=args.seed, epochs=args.epochs, views=args.views)
            config = replace(config, stages={stage: replace(s, epochs=stage_epochs.get(stage, s.epochs))
                                             for stage, s in config.stages.items()})
            if config.views not in prepared:
                prepared[config.views] = prepare_views(backbone, data, config)
            checkpoint = out / f"{label.replace(' ', '-')}-k{shots}.safetensors"
            job = TrainJob(method=name, data=args.data, out=str(checkpoint), shots=shots, train=config,
                           backbone=backbone.config, options={**preset.options, **extra},
                           preset=header_entry(preset, preset_file))
            bar = tqdm(total=config.total_epochs(method_class(name).stages), desc=f"{label} k={shots}", unit="epoch")
            history, header = train(job, create_method(name, backbone, **job.options), data, used, [category.name],
                                    prepared[config.views],
                                    progress=lambda stage, epoch, step, steps, losses: bar.update(step == steps - 1))
            bar.close()
            method = load_checkpoint(job.out, backbone)  # score what was saved, as eval --checkpoint does
            return {"method": label, "shots": shots, "mode": "trained", "checkpoint": header["identity"],
                    "train_s": header["training"]["seconds"],
                    "final_loss": {k: round(v, 4) for k, v in history[-1].items() if k not in ("stage", "epoch", "lr")},
                    **test.score(method, exclude)}

        def untrained(name: str) -> object:
            return create_method(name, backbone, **presets[name][0].options)

        if "aprilgan" in args.runs:
            record({"method": "aprilgan", "shots": shots, "mode": "untrained (zero-shot)",
                    **test.score(untrained("aprilgan"), exclude)})
            record({"method": "aprilgan", "shots": shots, "mode": "few-shot memory",
                    **test.score(untrained("aprilgan"), exclude, normal_shots)})
            record(trained("aprilgan", "aprilgan", {}))
        if "core-clip untrained" in args.runs:
            record({"method": "core-clip", "shots": shots, "mode": "untrained",
                    **test.score(untrained("core-clip"), exclude)})
        for label, extra in VARIANTS.items():
            if label in args.runs:
                record(trained(label, "core-clip", extra))
        if "winclip" in args.runs:
            sub = test.subset
            anchors = None
            for mode, references in (("zero-shot", None), ("few-shot (WinCLIP+)", normal_shots)):
                t0 = time.monotonic()
                winclip = create_method("winclip", backbone)
                row = evaluate_images(winclip, images[sub], masks[sub], labels[sub], category.name, references,
                                      anchors=anchors)
                anchors = winclip.anchors
                record({"method": "winclip", "shots": shots, "mode": mode, "score_s": round(time.monotonic() - t0, 1),
                        "subset": row})

    def fmt(r):
        return f"{100 * r['image_auroc']:5.1f} / {100 * r['pixel_auroc']:5.1f} / {100 * r['aupro']:5.1f}"
    print(f"\npreset {args.preset}; I-AUROC / P-AUROC / AUPRO, %, on the rest of {args.data} and on the subset")
    for r in rows:
        rest = fmt(r["rest"]) if "rest" in r else "-"
        print(f"{r['method']:<28}{r['shots']:>3}  {r['mode']:<22}{rest:>24}   {fmt(r['subset']):>24}")
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
