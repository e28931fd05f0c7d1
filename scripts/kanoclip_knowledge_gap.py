"""KAnoCLIP's knowledge loss at work: per class, the argument of L_KD's hinge,
``d(k, a) - d(k, n)`` (k: the class's knowledge-pack descriptions, a / n: the learned abnormal /
normal prompts), for the untrained method of a preset and for trained checkpoints. L_KD is
zero, and gives no gradient, wherever it is negative.

    python scripts/kanoclip_knowledge_gap.py runs/fewshot/kanoclip-k4.safetensors \
        --classes mpdd_metal_plate magnetic_tile
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from linewatch.scoring.backbone import Backbone
from linewatch.scoring.checkpoint import load_checkpoint
from linewatch.scoring.methods import create_method
from linewatch.scoring.preset import backbone_config, load_preset


def gaps(method, classes: list[str]) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for name in classes:
            normal, abnormal = method.class_anchors(name)
            k = F.normalize(method.class_knowledge(name).mean(0), dim=-1)
            out[name] = round(float((k - abnormal).norm() - (k - normal).norm()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="trained kanoclip checkpoints (same backbone as the preset)")
    parser.add_argument("--classes", nargs="+", required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preset, _ = load_preset("kanoclip", args.preset)
    backbone = Backbone.build(backbone_config(preset, {"seed": args.seed}))
    print(f"backbone {backbone.identity}; d(k, a) - d(k, n) per class")
    print("untrained", gaps(create_method("kanoclip", backbone, **preset.options), args.classes))
    for path in args.checkpoints:
        print(path, gaps(load_checkpoint(path, backbone), args.classes))


if __name__ == "__main__":
    main()
