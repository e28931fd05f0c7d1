"""The few-shot table: each trainable method, untrained vs trained on k shots, on the rest
of the dataset, plus the cross-dataset figures (trained on DATA, tested on each CROSS).

The same code paths as `linewatch train --preset P` / `linewatch eval --checkpoint` (preset,
sampling, augmentation, training, checkpoints, scoring, metrics), but the frozen backbone runs
once per image for the whole table: test features are computed once per backbone and shared
by every row, which on a CPU is the difference between minutes and hours. Checkpoints land
in OUT.

    python scripts/fewshot_table.py --data ../shared/datasets/mpdd_metal_plate \
        --methods aa-clip madclip --shots 4 8 --preset cpu --out runs/fewshot

``--option KEY=VALUE`` (repeatable) sets a method option on top of the preset's, e.g. an
ablation switch (``--option bicmci=false``); the row records the options used.

``--references`` also scores each trained method with k normal references from train/good (as
``linewatch train --eval-shots k``), once as the method blends them (its ``text_weight``) and
once from the references alone (``text_weight=0``): the held-out check of the memory blend.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from linewatch.cli.args import option
from linewatch.offline.datasets import find_categories, load_mask
from linewatch.offline.fewshot import training_set
from linewatch.scoring.backbone import Backbone
from linewatch.scoring.checkpoint import load_checkpoint, save_checkpoint
from linewatch.scoring.methods import create_method
from linewatch.scoring.metrics import image_metrics, pixel_metrics
from linewatch.scoring.pixels import load_image
from linewatch.scoring.preset import backbone_config, header_entry, load_preset, train_config
from linewatch.scoring.training import augment, extract_features, fit


def test_set(root: str, size: int):
    samples = [(c.name, c.root, s) for c in find_categories(root) for s in c.test]
    keys = [f"{name}/{s.path.relative_to(croot).as_posix()}" for name, croot, s in samples]
    images = torch.stack([load_image(s.path, size) for _, _, s in tqdm(samples, desc=f"load {Path(root).name}", leave=False)])
    masks = torch.stack([load_mask(s.mask_path, size) for _, _, s in samples]).numpy()
    labels = np.array([s.label for _, _, s in samples])
    return keys, [name for name, _, _ in samples], images, masks, labels


def cached_features(backbone, images, root: str, cache: Path | None, desc: str):
    """Frozen-backbone features of ``images``; kept in ``cache`` (safetensors) when given, so
    re-running the table with other training settings skips the backbone pass."""
    from safetensors.torch import load_file, save_file

    from linewatch.scoring.backbone import VisualFeatures

    path = None
    vv = backbone.config.vv_attention
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        layers = "-".join(map(str, backbone.layers))
        path = cache / (f"{backbone.identity.replace(':', '_')}-{Path(root).name}-{backbone.image_size}-L{layers}"
                        f"{'-vv' if vv else ''}-{len(images)}.safetensors")
        if path.is_file():
            t = load_file(str(path))
            levels = len(backbone.layers)
            tokens = [t[f"tokens{i}"] for i in range(levels)]
            local = [t[f"local{i}"] for i in range(levels)] if vv else tokens
            grid = (backbone.image_size // backbone.patch_size,) * 2
            return VisualFeatures(t["image_embed"], tokens, [t[f"embeds{i}"] for i in range(levels)], grid, local)
    bar = tqdm(total=len(images), desc=desc, unit="img")
    features = extract_features(backbone, images, on_chunk=bar.update)
    bar.close()
    if path is not None:
        save_file({"image_embed": features.image_embed.contiguous(),
                   **{f"tokens{i}": t.contiguous() for i, t in enumerate(features.patch_tokens)},
                   **({f"local{i}": t.contiguous() for i, t in enumerate(features.local_tokens)} if vv else {}),
                   **{f"embeds{i}": t.contiguous() for i, t in enumerate(features.patch_embeds)}}, str(path))
    return features


def evaluate(method, features, keys, classes, masks, labels, exclude: set[str], size: int,
             references: dict | None = None, anchors: dict | None = None) -> dict:
    """Metrics on the test images not in ``exclude``, scored from their cached features;
    ``references`` (normal images by class) fill the method's few-shot memory; ``anchors`` (by
    class), when given, spare building them again (hundreds of sentences through the text tower)."""
    keep = [i for i, key in enumerate(keys) if key not in exclude]
    scores, maps, order = [], [], []
    for class_name in sorted(set(classes[i] for i in keep)):
        index = [i for i in keep if classes[i] == class_name]
        order += index
        method.prepare(class_name, (references or {}).get(class_name), anchors=(anchors or {}).get(class_name))
        with torch.inference_mode():
            for chunk in torch.tensor(index).split(32):
                result = method.score_features(features.select(chunk), (size, size))
                scores.append(result.image_score.float().cpu())
                maps.append(result.anomaly_map.float().cpu())
    row = {"images": len(order), **image_metrics(labels[order], torch.cat(scores).numpy()),
           **pixel_metrics(masks[order], torch.cat(maps).numpy())}
    return {k: row[k] for k in ("images", "image_auroc", "pixel_auroc", "aupro")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--cross", nargs="+", default=[], help="datasets to test the checkpoints on as they are")
    parser.add_argument("--cross-only", action="store_true",
                        help="test on --cross only, not on the rest of --data (skips its test-set backbone pass)")
    parser.add_argument("--methods", nargs="+", default=["aprilgan", "aa-clip", "madclip"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--preset", default="cpu", help="each method's preset (a bundled name), as linewatch train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fewshot")
    parser.add_argument("--features-cache", default=None, help="folder to keep test-set backbone features in")
    parser.add_argument("--epochs", type=int, default=None, help="every stage's epochs (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="every stage's rate (default: the preset's)")
    parser.add_argument("--views", type=int, default=None, help="default: the preset's")
    parser.add_argument("--references", action="store_true",
                        help="also score the trained methods with k normal references (blended, and alone)")
    parser.add_argument("--option", dest="options", type=option, action="append", default=[], metavar="KEY=VALUE",
                        help="method option on top of the preset's, repeatable")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    cache = Path(args.features_cache) if args.features_cache else None
    backbones: dict = {}  # BackboneConfig -> (backbone, test set and features, cross set and features)
    rows = []
    categories = find_categories(args.data)
    for name in args.methods:
        preset, preset_file = load_preset(name, args.preset)
        config = train_config(preset, seed=args.seed, epochs=args.epochs, lr=args.lr, views=args.views)
        backbone_spec = backbone_config(preset, {"seed": args.seed})
        if backbone_spec not in backbones:
            backbone = Backbone.build(backbone_spec)
            size = backbone.image_size
            test = test_features = None
            if not args.cross_only:
                test = test_set(args.data, size)
                test_features = cached_features(backbone, test[2], args.data, cache, "test features")
            crosses = {}
            for root in args.cross:
                cross = test_set(root, size)
                crosses[Path(root).name] = cross, cached_features(backbone, cross[2], root, cache, "cross features")
            backbones[backbone_spec] = backbone, test, test_features, crosses
            print(f"backbone {backbone.identity} at {size} px, layers {backbone.layers}, "
                  f"V-V {backbone_spec.vv_attention}; "
                  f"features after {time.monotonic() - started:.0f} s")
        backbone, test, test_features, crosses = backbones[backbone_spec]
        size = backbone.image_size
        options = {**preset.options, **dict(args.options)}
        print(f"{name}: preset {preset.name} ({preset.digest}), options {options}; train {config}")
        for shots in args.shots:
            data, used = training_set(categories, shots, args.seed, size)
            views = augment(data, config.views, torch.Generator().manual_seed(args.seed))
            train_features = extract_features(backbone, views.images)
            method = create_method(name, backbone, **options)
            exclude = {u['path'] for u in used}
            untrained = evaluate(method, test_features, *test[:2], *test[3:], exclude, size) if test else None
            t0 = time.monotonic()
            bar = tqdm(total=config.total_epochs(method.stages), desc=f"{name} k={shots}", unit="epoch")
            history = fit(method, views, config, features=train_features,
                          progress=lambda stage, epoch, step, steps, losses: bar.update(step == steps - 1))
            bar.close()
            path = out / f"{name}-k{shots}.safetensors"
            save_checkpoint(path, method, options, preset=header_entry(preset, preset_file),
                            training={"shots": shots, "data": args.data, "test_images_used": used, **asdict(config)})
            method = load_checkpoint(path, backbone)  # score what was saved, as eval --checkpoint does
            trained = evaluate(method, test_features, *test[:2], *test[3:], exclude, size) if test else None
            row = {"method": name, "shots": shots, "preset": preset.name, "options": dict(args.options),
                   "backbone": backbone.identity, "vv_attention": backbone_spec.vv_attention,
                   "train_s": round(time.monotonic() - t0, 1), "final_loss": history[-1],
                   "max_loss": {k: max(h[k] for h in history) for k in history[-1] if k not in ("stage", "epoch", "lr")},
                   "untrained": untrained, "trained": trained, "cross": {}}
            for cross_name, (cross, cross_features) in crosses.items():
                row["cross"][cross_name] = {
                    "untrained": evaluate(create_method(name, backbone, **options), cross_features, *cross[:2],
                                          *cross[3:], set(), size),
                    "trained": evaluate(method, cross_features, *cross[:2], *cross[3:], set(), size)}
            if args.references and test:
                references = {c.name: torch.stack([load_image(p, size) for p in c.references(shots, args.seed)])
                              for c in categories}
                row["references"] = evaluate(method, test_features, *test[:2], *test[3:], exclude, size, references)
                blended_weight, method.text_weight = method.text_weight, 0.0
                row["references_only"] = evaluate(method, test_features, *test[:2], *test[3:], exclude, size,
                                                  references)
                method.text_weight = blended_weight
            rows.append(row)
            print(json.dumps(row))
            (out / "table.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))

    def fmt(r):
        if r is None:
            return f"{'-':>20}"
        return f"{100 * r['image_auroc']:6.1f} {100 * r['pixel_auroc']:6.1f} {100 * r['aupro']:6.1f}"
    print(f"\npreset {args.preset}; I-AUROC P-AUROC AUPRO on the rest of {args.data}")
    names = [Path(root).name for root in args.cross]
    refs = ["references", "references_only"] if args.references else []
    print(f"{'method':<10}{'k':>3}  {'untrained':>20}  {'trained':>20}" + "".join(f"  {'trained + ' + r:>20}" for r in refs)
          + "".join(f"  {name + ' untrained':>20}  {name + ' trained':>20}" for name in names))
    for r in rows:
        print(f"{r['method']:<10}{r['shots']:>3}  {fmt(r['untrained'])}  {fmt(r['trained'])}"
              + "".join(f"  {fmt(r.get(k))}" for k in refs)
              + "".join(f"  {fmt(r['cross'][n]['untrained'])}  {fmt(r['cross'][n]['trained'])}" for n in names))


if __name__ == "__main__":
    main()
