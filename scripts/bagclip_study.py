"""BAG-CLIP's two studies beyond the few-shot table (``fewshot_table.py``), on the same code
paths (sampling, augmentation, fit, checkpoints, scoring, metrics) and cached test features:

* ``ablation``: variants of the cpu preset (full; no SAG; no SAFR; K 5 / 30; P 2 / 7) trained on
  k shots of DATA and tested on the rest, each row beside the untrained full method;
* ``cross``: the paper's direction, trained on k shots of every category of the TRAIN datasets
  together, tested zero-shot on TEST; every method in ``--methods`` trained the same way.

    python scripts/bagclip_study.py ablation --data ../shared/datasets/mpdd_metal_plate --shots 4 8
    python scripts/bagclip_study.py cross --train ../shared/datasets/magnetic_tile \
        ../shared/datasets/mpdd_metal_plate --test ../shared/datasets/cplid_insulator --shots 16
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from fewshot_table import cached_features, evaluate, test_set
from tqdm import tqdm

from linewatch.offline.datasets import find_categories
from linewatch.offline.fewshot import training_set
from linewatch.scoring.backbone import Backbone
from linewatch.scoring.checkpoint import load_checkpoint, save_checkpoint
from linewatch.scoring.methods import create_method
from linewatch.scoring.preset import backbone_config, header_entry, load_preset, train_config
from linewatch.scoring.training import augment, extract_features, fit

VARIANTS = {"full": {}, "no SAG": {"gcn_layers": 0}, "no SAFR": {"safr": False},
            "K 5": {"neighbours": 5}, "K 30": {"neighbours": 30}, "P 2": {"gcn_layers": 2}, "P 7": {"gcn_layers": 7}}


def train_and_save(name, backbone, preset, preset_file, config, views, features, options, path, note) -> tuple:
    method = create_method(name, backbone, **options)
    began = time.monotonic()
    bar = tqdm(total=config.total_epochs(method.stages), desc=note, unit="epoch")
    fit(method, views, config, features=features, progress=lambda stage, epoch, step, steps, _: bar.update(step == steps - 1))
    bar.close()
    seconds = round(time.monotonic() - began, 1)
    save_checkpoint(path, method, options, preset=header_entry(preset, preset_file),
                    training={"note": note, **asdict(config)})
    return load_checkpoint(path, backbone), seconds  # score what was saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["ablation", "cross"])
    parser.add_argument("--data", help="ablation: the dataset (train on k shots, test on the rest)")
    parser.add_argument("--train", nargs="+", help="cross: datasets trained on together")
    parser.add_argument("--test", help="cross: the dataset tested on")
    parser.add_argument("--methods", nargs="+", default=["bag-clip", "aprilgan"], help="cross: methods compared")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shots", nargs="+", type=int, default=[4])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    parser.add_argument("--views", type=int, default=None, help="augmented views per image (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", default=None, help="default: the preset's (another drops its size and layers)")
    parser.add_argument("--features-cache", default=None)
    parser.add_argument("--out", default="runs/bagclip-study")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.features_cache) if args.features_cache else None
    methods = ["bag-clip"] if args.study == "ablation" else args.methods
    train_roots = [args.data] if args.study == "ablation" else args.train
    test_root = args.data if args.study == "ablation" else args.test
    categories = [c for root in train_roots for c in find_categories(root)]
    rows, backbones = [], {}
    for name in methods:
        preset, preset_file = load_preset(name, args.preset)
        config = train_config(preset, seed=args.seed, epochs=args.epochs, views=args.views)
        spec = backbone_config(preset, {"seed": args.seed, "arch": args.arch})
        if spec not in backbones:
            backbone = Backbone.build(spec)
            test = test_set(test_root, backbone.image_size)
            backbones[spec] = backbone, test, cached_features(backbone, test[2], test_root, cache, "test features"), {}
        backbone, test, test_features, train_cache = backbones[spec]
        size = backbone.image_size
        for shots in args.shots:
            if (shots, config.views) not in train_cache:
                data, used = training_set(categories, shots, args.seed, size)
                views = augment(data, config.views, torch.Generator().manual_seed(args.seed))
                train_cache[(shots, config.views)] = views, extract_features(backbone, views.images), used
            views, train_features, used = train_cache[(shots, config.views)]
            exclude = {u["path"] for u in used} if args.study == "ablation" else set()
            scored = lambda method: evaluate(method, test_features, *test[:2], *test[3:], exclude, size)
            untrained = scored(create_method(name, backbone, **preset.options))
            for variant in (args.variants if name == "bag-clip" and args.study == "ablation" else ["full"]):
                options = {**preset.options, **VARIANTS[variant]}
                note = f"{name} {variant} k={shots}"
                path = out / f"{name}-{variant.replace(' ', '')}-k{shots}.safetensors"
                method, seconds = train_and_save(name, backbone, preset, preset_file, config, views, train_features,
                                                 options, path, note)
                row = {"study": args.study, "method": name, "variant": variant, "shots": shots, "options": options,
                       "epochs": config.total_epochs(method.stages), "train": [str(r) for r in train_roots],
                       "test": str(test_root), "backbone": backbone.identity, "train_s": seconds,
                       "untrained": untrained, "trained": scored(method)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                (out / f"{args.study}.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))

    def fmt(r):
        return f"{100 * r['pixel_auroc']:5.1f} / {100 * r['aupro']:5.1f} / {100 * r['image_auroc']:5.1f}"
    print(f"\n{args.study}: pixel AUROC / AUPRO / image AUROC, % (tested on {test_root})")
    for r in rows:
        print(f"{r['method']:<9} {r['variant']:<8} k={r['shots']:<3} untrained {fmt(r['untrained'])}   "
              f"trained {fmt(r['trained'])}   {r['train_s']} s")


if __name__ == "__main__":
    main()
