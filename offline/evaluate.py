"""`linewatch eval`: score MVTec-layout categories with one method and report the papers' metrics."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..scoring.backbone import Backbone, BackboneConfig
from ..scoring.checkpoint import load_checkpoint, read_header
from ..scoring.methods import check_options, create_method
from ..scoring.metrics import image_metrics, pixel_metrics
from ..scoring.pixels import load_image
from ..scoring.prompts import PromptPack
from .datasets import Category, find_categories, load_mask

COLUMNS = [("image_auroc", "I-AUROC"), ("image_ap", "I-AP"), ("image_f1_max", "I-F1max"),
           ("pixel_auroc", "P-AUROC"), ("pixel_ap", "P-AP"), ("pixel_f1_max", "P-F1max"), ("aupro", "AUPRO")]


@dataclass
class EvalConfig:
    method: str = "aprilgan"  # scoring.options.DEFAULT_METHOD
    data: str = ""
    shots: int = 0
    backbone: BackboneConfig = BackboneConfig()
    prompts: str | None = None
    options: dict = field(default_factory=dict)  # method keyword options, e.g. {"text_weight": 0}
    batch_size: int = 8
    seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None  # trained method; its backbone and method replace the fields above


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def evaluate_category(method, category: Category, config: EvalConfig, image_size: int) -> dict:
    references = None
    if config.shots:
        paths = category.references(config.shots, config.seed)
        references = torch.stack([load_image(p, image_size) for p in paths])
    method.prepare(category.name, reference_images=references)

    scores, maps, labels, masks = [], [], [], []
    with tqdm(total=len(category.test), desc=category.name, unit="img", leave=False) as progress:
        for batch in _batches(category.test, config.batch_size):
            images = torch.stack([load_image(s.path, image_size) for s in batch])
            result = method.score(images)
            scores.append(result.image_score.float().cpu())
            maps.append(result.anomaly_map.float().cpu())
            labels += [s.label for s in batch]
            masks += [load_mask(s.mask_path, image_size) for s in batch]
            progress.update(len(batch))

    row = {"images": len(labels), "anomalous": int(sum(labels))}
    row.update(image_metrics(np.array(labels), torch.cat(scores).numpy()))
    if category.has_masks:
        row.update(pixel_metrics(torch.stack(masks).numpy(), torch.cat(maps).numpy()))
    else:
        row.update({key: math.nan for key, _ in COLUMNS if key.startswith(("pixel", "aupro"))})
    return row


def drop_training_images(categories: list[Category], used: list[dict]) -> int:
    """Leave out the test images a checkpoint was trained on: same file name and same bytes,
    so another dataset with the same names keeps all its images."""
    from .fewshot import file_digest

    digests = {Path(u["path"]).name: set() for u in used}
    for u in used:
        digests[Path(u["path"]).name].add(u["sha256"])
    dropped = 0
    for category in categories:
        keep = [s for s in category.test if s.path.name not in digests or file_digest(s.path) not in digests[s.path.name]]
        dropped += len(category.test) - len(keep)
        category.test = keep
    return dropped


def evaluate(config: EvalConfig, method=None) -> dict:
    """Evaluate ``config.method`` (or the checkpoint, or an already built ``method``)."""
    # Every check a user can fail runs before the (possibly downloaded) model is built.
    categories = find_categories(config.data)
    header = read_header(config.checkpoint) if config.checkpoint else getattr(method, "checkpoint", None)
    if header is None and method is None:
        check_options(config.method, config.options)
    if header is not None:
        dropped = drop_training_images(categories, header["training"].get("test_images_used", []))
        if dropped:
            print(f"note: left out {dropped} test images the checkpoint was trained on", file=sys.stderr)
    prompts = PromptPack.load(config.prompts) if config.prompts or header is None else None
    for category in categories:
        if config.shots:
            category.references(config.shots, config.seed)
        if not category.has_masks:
            print(f"note: {category.name}: some anomalous images have no <stem>_mask.png under ground_truth/; "
                  "pixel metrics are skipped for it", file=sys.stderr)
    if method is None:
        backbone = Backbone.build(config.backbone, config.device)
        method = (load_checkpoint(config.checkpoint, backbone, prompts) if config.checkpoint
                  else create_method(config.method, backbone, prompts, **config.options))
    backbone = method.backbone
    results = {}
    for category in tqdm(categories, desc="categories", unit="cat", disable=len(categories) == 1):
        results[category.name] = evaluate_category(method, category, config, backbone.image_size)
    mean = {key: float(np.nanmean([r[key] for r in results.values()])) if any(
        not math.isnan(r[key]) for r in results.values()) else math.nan for key, _ in COLUMNS}
    return {
        "method": method.name,
        "checkpoint": None if header is None else {"path": config.checkpoint, "identity": header["identity"],
                                                   "trained_on": header["training"].get("data")},
        "shots": config.shots,
        "options": header["options"] if header else config.options,
        "backbone": {**asdict(backbone.config), "identity": backbone.identity, "image_size": backbone.image_size,
                     "layers": list(backbone.layers)},
        "prompts": config.prompts or ("checkpoint" if header else "default"),
        "seed": config.seed,
        "device": config.device,
        "categories": results,
        "mean": mean,
    }


def format_table(report: dict) -> str:
    header = f"{'category':<22}{'n':>5}" + "".join(f"{title:>9}" for _, title in COLUMNS)

    def line(name: str, n: str, row: dict) -> str:
        return f"{name:<22}{n:>5}" + "".join(f"{100 * row[key]:>9.1f}" if not math.isnan(row[key]) else f"{'-':>9}"
                                           for key, _ in COLUMNS)

    lines = [header, "-" * len(header)]
    lines += [line(name, str(row["images"]), row) for name, row in report["categories"].items()]
    lines += ["-" * len(header), line("mean", "", report["mean"])]
    weights = report["backbone"]["identity"]
    note = "  (random weights: only few-shot memory figures mean anything)" if "random-seed" in weights else ""
    options = "".join(f", {k}={_shown(v)}" for k, v in report["options"].items())
    if report.get("checkpoint"):
        options += f", checkpoint {report['checkpoint']['identity']} (trained on {report['checkpoint']['trained_on']})"
    shots = f"{report['shots']}-shot" + (f" ({report['shots_from']})" if report.get("shots_from") else "")
    return "\n".join([f"method {report['method']}{options}, {shots}, {weights}, "
                      f"{report['backbone']['image_size']} px{note}", *lines])


def _shown(value) -> str:
    """An option as the table's header line shows it: content carried whole (KAnoCLIP's
    knowledge pack in a checkpoint) by its digest."""
    return f"digest:{value['digest']}" if isinstance(value, dict) and "digest" in value else str(value)


def _json_safe(value):
    """NaN (a metric undefined for a category) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
