"""The few-shot table: each trainable method, untrained vs trained on k shots, on the rest
of the dataset, plus the cross-dataset figures (trained on DATA, tested on CROSS).

The same code paths as `linewatch train` / `linewatch eval --checkpoint` (sampling,
augmentation, training, checkpoints, scoring, metrics), but the frozen backbone runs once
per image for the whole table: test features are computed once and shared by every row,
which on a CPU is the difference between minutes and hours. Checkpoints land in OUT.

    python scripts/fewshot_table.py --data ../shared/datasets/magnetic_tile \
        --cross ../shared/datasets/mpdd_metal_plate --shots 4 8 --out runs/fewshot
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from linewatch.offline.datasets import find_categories, load_mask
from linewatch.offline.fewshot import training_set
from linewatch.scoring.backbone import Backbone, BackboneConfig
from linewatch.scoring.checkpoint import load_checkpoint, save_checkpoint
from linewatch.scoring.methods import create_method
from linewatch.scoring.metrics import image_metrics, pixel_metrics
from linewatch.scoring.pixels import load_image
from linewatch.scoring.training import TrainConfig, augment, extract_features, fit


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
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{backbone.identity.replace(':', '_')}-{Path(root).name}-{backbone.image_size}-{len(images)}.safetensors"
        if path.is_file():
            t = load_file(str(path))
            levels = len(backbone.layers)
            tokens = [t[f"tokens{i}"] for i in range(levels)]
            grid = (backbone.image_size // backbone.patch_size,) * 2
            return VisualFeatures(t["image_embed"], tokens, [t[f"embeds{i}"] for i in range(levels)], grid, tokens)
    bar = tqdm(total=len(images), desc=desc, unit="img")
    features = extract_features(backbone, images, on_chunk=bar.update)
    bar.close()
    if path is not None:
        save_file({"image_embed": features.image_embed.contiguous(),
                   **{f"tokens{i}": t.contiguous() for i, t in enumerate(features.patch_tokens)},
                   **{f"embeds{i}": t.contiguous() for i, t in enumerate(features.patch_embeds)}}, str(path))
    return features


def evaluate(method, features, keys, classes, masks, labels, exclude: set[str], size: int) -> dict:
    keep = [i for i, key in enumerate(keys) if key not in exclude]
    scores, maps, order = [], [], []
    for class_name in sorted(set(classes[i] for i in keep)):
        index = [i for i in keep if classes[i] == class_name]
        order += index
        method.prepare(class_name)
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
    parser.add_argument("--cross", default=None)
    parser.add_argument("--methods", nargs="+", default=["aprilgan", "aa-clip", "madclip"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fewshot")
    parser.add_argument("--features-cache", default=None, help="folder to keep test-set backbone features in")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--views", type=int, default=TrainConfig.views)
    parser.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())

    backbone = Backbone.build(BackboneConfig(arch=args.arch, seed=args.seed))
    size = backbone.image_size
    config = TrainConfig(epochs=args.epochs, lr=args.lr, views=args.views, weight_decay=args.weight_decay, seed=args.seed)
    print(f"backbone {backbone.identity} at {size} px, layers {backbone.layers}; train {config}")

    started = time.monotonic()
    cache = Path(args.features_cache) if args.features_cache else None
    test = test_set(args.data, size)
    test_features = cached_features(backbone, test[2], args.data, cache, "test features")
    cross = cross_features = None
    if args.cross:
        cross = test_set(args.cross, size)
        cross_features = cached_features(backbone, cross[2], args.cross, cache, "cross features")
    print(f"features in {time.monotonic() - started:.0f} s")

    rows = []
    categories = find_categories(args.data)
    for shots in args.shots:
        data, used = training_set(categories, shots, args.seed, size)
        views = augment(data, config.views, torch.Generator().manual_seed(args.seed))
        train_features = extract_features(backbone, views.images)
        for name in args.methods:
            torch.manual_seed(args.seed)
            method = create_method(name, backbone)
            untrained = evaluate(method, test_features, *test[:2], *test[3:], {u['path'] for u in used}, size)
            t0 = time.monotonic()
            bar = tqdm(total=len(method.stages) * config.epochs, desc=f"{name} k={shots}", unit="epoch")
            fit(method, views, config, features=train_features,
                progress=lambda stage, epoch, step, steps, losses: bar.update(step == steps - 1))
            bar.close()
            path = out / f"{name}-k{shots}.safetensors"
            save_checkpoint(path, method, {}, training={"shots": shots, "data": args.data, "test_images_used": used,
                                                         **{k: getattr(config, k) for k in ("epochs", "lr", "views", "weight_decay", "seed")}})
            method = load_checkpoint(path, backbone)  # score what was saved, as eval --checkpoint does
            trained = evaluate(method, test_features, *test[:2], *test[3:], {u['path'] for u in used}, size)
            row = {"method": name, "shots": shots, "train_s": round(time.monotonic() - t0, 1),
                   "untrained": untrained, "trained": trained}
            if cross:
                torch.manual_seed(args.seed)
                row["cross_untrained"] = evaluate(create_method(name, backbone), cross_features, *cross[:2], *cross[3:], set(), size)
                row["cross_trained"] = evaluate(method, cross_features, *cross[:2], *cross[3:], set(), size)
            rows.append(row)
            print(json.dumps(row))
            (out / "table.json").write_text(json.dumps({"backbone": backbone.identity, "image_size": size,
                                                        "config": vars(args), "rows": rows}, indent=2))

    def fmt(r):
        return f"{100 * r['image_auroc']:6.1f} {100 * r['pixel_auroc']:6.1f} {100 * r['aupro']:6.1f}"
    print(f"\n{backbone.identity}, {size} px; I-AUROC P-AUROC AUPRO on the rest of {args.data}")
    print(f"{'method':<10}{'k':>3}  {'untrained':>20}  {'trained':>20}" + ("  {:>20}  {:>20}".format("cross untrained", "cross trained") if cross else ""))
    for r in rows:
        line = f"{r['method']:<10}{r['shots']:>3}  {fmt(r['untrained'])}  {fmt(r['trained'])}"
        if cross:
            line += f"  {fmt(r['cross_untrained'])}  {fmt(r['cross_trained'])}"
        print(line)


if __name__ == "__main__":
    main()
