"""The context-anomaly table: CoRe-CLIP against appearance-only scorers on the generated
context set (``linewatch demo OUT --context-set``), with its ablations.

Per shot count k (k normal + k anomalous training images, sampled as ``linewatch train``),
scored on the rest of the test split:
  aprilgan        untrained (zero-shot), few-shot memory (the k normal shots as references),
                  trained (the cpu preset)
  core-clip       untrained (row "core-clip untrained"), trained (the cpu preset); ablations
                  trained the same way: global branch only (branches=[global]) and plain
                  averaging (fusion=mean). The text stage does not see the branches or the
                  fusion, so it is trained once and every variant trains its image stage on
                  it (the same t0, t1 in every row; the image stage's batch order starts afresh)
  winclip         zero-shot and few-shot (WinCLIP+, the k normal shots) on a small subset of
                  the test split only: its window passes cost seconds per image on a CPU.
                  Every other row is reported on that subset too.
The frozen backbone runs once per test image for the whole table (features shared by every
row, as ``fewshot_table.py``); training goes through the same preset, sampling, fit and
checkpoint as ``linewatch train``. Checkpoints land in OUT.

    OMP_NUM_THREADS=1 python scripts/context_table.py --data runs/ctxset --shots 8 \
        --out runs/context-table --features-cache runs/features --subset 24
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from fewshot_table import cached_features, evaluate, test_set
from tqdm import tqdm

from linewatch.offline.datasets import find_categories
from linewatch.offline.fewshot import sample_category, training_set
from linewatch.scoring import training
from linewatch.scoring.backbone import Backbone
from linewatch.scoring.checkpoint import load_checkpoint, save_checkpoint
from linewatch.scoring.methods import create_method
from linewatch.scoring.metrics import image_metrics, pixel_metrics
from linewatch.scoring.preset import backbone_config, header_entry, load_preset, train_config
from linewatch.scoring.training import augment, extract_features, fit

VARIANTS = {"core-clip": {}, "core-clip global only": {"branches": ["global"]},
            "core-clip plain averaging": {"fusion": "mean"}}
RUNS = ["aprilgan", "core-clip untrained", *VARIANTS, "winclip"]


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


def train_text_stage(method, views, config, features, desc):
    """CoRe-CLIP's text stage alone: (text adapter state, t0/t1 per class, history, seconds). It
    does not depend on the image branches or the fusion, so every variant shares it."""
    t0 = time.monotonic()
    method.stages = ("text",)
    bar = tqdm(total=config.total_epochs(method.stages), desc=desc, unit="epoch")
    history = fit(method, views, config, features=features,
                  progress=lambda stage, epoch, step, steps, losses: bar.update(step == steps - 1))
    bar.close()
    with torch.no_grad():
        anchors = {c: method.class_anchors(c) for c in sorted(set(views.class_names))}
    return ({k: v.clone() for k, v in method.text.state_dict().items()}, anchors, history,
            time.monotonic() - t0)


def memoised_view_features():
    """``training.view_features`` computed once per training set and view: fit asks for them
    on every run, and the core-clip rows train on the same images."""
    original, cache = training.view_features, {}

    def view_features(backbone, data, features, views):
        missing = [v for v in views if (id(data), v) not in cache]
        if missing:
            cache.update({(id(data), v): f for v, f in original(backbone, data, features, tuple(missing)).items()})
        return {v: cache[(id(data), v)] for v in views}
    return view_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the generated set (linewatch demo OUT --context-set)")
    parser.add_argument("--shots", nargs="+", type=int, default=[8])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--views", type=int, default=None, help="default: the preset's")
    parser.add_argument("--epochs", type=int, default=None, help="every stage's epochs (default: the preset's)")
    parser.add_argument("--stage-epochs", nargs="+", default=[], metavar="STAGE=N",
                        help="one stage's epochs, e.g. image=15 (core-clip's image stage; other methods' stages keep theirs)")
    parser.add_argument("--subset", type=int, default=24, help="test images WinCLIP is scored on (and every row again)")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS,
                        help="which rows (default all; a table can be made in parts, each with its own OUT)")
    parser.add_argument("--out", default="runs/context-table")
    parser.add_argument("--features-cache", default=None)
    args = parser.parse_args()
    training.view_features = memoised_view_features()
    stage_epochs = {}
    for item in args.stage_epochs:
        stage, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            parser.error(f"--stage-epochs takes STAGE=N with N >= 1, got {item!r}")
        stage_epochs[stage] = int(n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    categories = find_categories(args.data)
    (category,) = categories
    presets = {name: load_preset(name, args.preset) for name in ("core-clip", "aprilgan")}
    specs = {backbone_config(preset, {"seed": args.seed}) for preset, _ in presets.values()}
    if len(specs) != 1:
        raise SystemExit(f"the {args.preset} presets of core-clip and aprilgan name different backbones: {specs}")
    backbone = Backbone.build(specs.pop())
    size = backbone.image_size
    keys, classes, images, masks, labels = test_set(args.data, size)
    features = cached_features(backbone, images, args.data, Path(args.features_cache) if args.features_cache else None,
                               "test features")
    used_any = set()
    for shots in args.shots:
        _, anomalous = sample_category(category, shots, args.seed)
        used_any |= {f"{category.name}/{s.path.relative_to(category.root).as_posix()}" for s in anomalous}
    subset = subset_of(keys, labels, used_any, args.subset, args.seed)
    subset_keys = {keys[i] for i in subset}
    not_subset = {k for k in keys if k not in subset_keys}
    print(f"backbone {backbone.identity} at {size} px, layers {backbone.layers}; {len(keys)} test images, "
          f"subset {len(subset)}; features after {time.monotonic() - started:.0f} s")

    # Text anchors by key (backbone, sentences, trained text parts): hundreds of sentences through
    # the text tower cost more than anything else here, and rows with the same text share them
    # (aprilgan's three rows; the core-clip variants, which share one trained text stage).
    anchor_cache = {}

    def both(method, exclude, references=None):
        key = method.anchor_key(category.name)
        anchors = {category.name: anchor_cache[key]} if key in anchor_cache else None
        rest = evaluate(method, features, keys, classes, masks, labels, exclude, size, references, anchors)
        anchor_cache[key] = method.anchors
        return {"rest": rest, "subset": evaluate(method, features, keys, classes, masks, labels, not_subset, size,
                                                 references, {category.name: method.anchors})}

    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row))
        (out / "table.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))

    for shots in args.shots:
        data, used = training_set(categories, shots, args.seed, size)
        exclude = {u["path"] for u in used}
        normal_shots = data.images[data.labels == 0]
        train_cache = {}
        if "aprilgan" in args.runs:
            record({"method": "aprilgan", "shots": shots, "mode": "untrained (zero-shot)",
                    **both(create_method("aprilgan", backbone, **presets["aprilgan"][0].options), exclude)})
            record({"method": "aprilgan", "shots": shots, "mode": "few-shot memory",
                    **both(create_method("aprilgan", backbone, **presets["aprilgan"][0].options), exclude, normal_shots)})
        if "core-clip untrained" in args.runs:
            record({"method": "core-clip", "shots": shots, "mode": "untrained",
                    **both(create_method("core-clip", backbone, **presets["core-clip"][0].options), exclude)})
        trained_runs = [(label, "core-clip", extra) for label, extra in VARIANTS.items() if label in args.runs]
        shared_text = None  # the core-clip rows' text stage: trained once, loaded into each variant
        for label, name, extra in [("aprilgan", "aprilgan", {})] * ("aprilgan" in args.runs) + trained_runs:
            preset, preset_file = presets[name]
            config = train_config(preset, seed=args.seed, epochs=args.epochs, views=args.views)
            config = replace(config, stages={stage: replace(s, epochs=stage_epochs.get(stage, s.epochs))
                                             for stage, s in config.stages.items()})
            if config.views not in train_cache:  # every row with this many views trains on the same ones
                views = augment(data, config.views, torch.Generator().manual_seed(args.seed))
                train_cache[config.views] = views, extract_features(backbone, views.images)
            views, train_features = train_cache[config.views]
            options = {**preset.options, **extra}
            method = create_method(name, backbone, **options)
            t0 = time.monotonic()
            text_history = []
            if name == "core-clip":
                if shared_text is None:
                    shared_text = train_text_stage(create_method(name, backbone, **preset.options), views, config,
                                                   train_features, f"text stage k={shots}")
                state, stage_anchors, text_history, text_s = shared_text
                method.text.load_state_dict(state)
                method.stages = ("image",)
                # the image stage's frozen t0, t1 are the shared text stage's: computed once
                method.class_anchors = lambda c, sample=None, m=method, t=stage_anchors: (
                    t[c] if sample is None else type(m).class_anchors(m, c, sample))
            bar = tqdm(total=config.total_epochs(method.stages), desc=f"{label} k={shots}", unit="epoch")
            history = text_history + fit(method, views, config, features=train_features,
                                         progress=lambda stage, epoch, step, steps, losses, bar=bar: bar.update(step == steps - 1))
            bar.close()
            if name == "core-clip":
                del method.class_anchors, method.stages  # back to the class's own
            path = out / f"{label.replace(' ', '-')}-k{shots}.safetensors"
            save_checkpoint(path, method, options, preset=header_entry(preset, preset_file),
                            training={"shots": shots, "data": args.data, "test_images_used": used, **asdict(config)})
            method = load_checkpoint(path, backbone)
            record({"method": label, "shots": shots, "mode": "trained",
                    "train_s": round(time.monotonic() - t0 + (text_s if name == "core-clip" else 0), 1),
                    "final_loss": {k: round(v, 4) for k, v in history[-1].items() if k not in ("stage", "epoch", "lr")},
                    **both(method, exclude)})
        if "winclip" in args.runs:
            sub_images, sub_masks, sub_labels = images[subset], masks[subset], labels[subset]
            anchors = None
            for mode, references in (("zero-shot", None), ("few-shot (WinCLIP+)", normal_shots)):
                t0 = time.monotonic()
                winclip = create_method("winclip", backbone)
                row = evaluate_images(winclip, sub_images, sub_masks, sub_labels, category.name, references, anchors=anchors)
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
