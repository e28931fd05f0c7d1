"""What a trained core-clip checkpoint does on a test split: CRM's alpha per branch (mean,
range, spread over images), the cosine between the branch embeddings, t0 . t1, and the
compatibility score on normal against anomalous images. Scored from cached backbone features
(``fewshot_table.py``'s cache), every branch on the whole frame as at test time.

    OMP_NUM_THREADS=1 python scripts/coreclip_alpha.py runs/ctx-core-preset/core-clip-k8.safetensors \
        --data runs/ctxset --features-cache runs/features
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from fewshot_table import cached_features, test_set

from linewatch.offline.datasets import find_categories
from linewatch.scoring.backbone import Backbone
from linewatch.scoring.checkpoint import checkpoint_backbone, load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True)
    parser.add_argument("--features-cache", default=None)
    args = parser.parse_args()
    backbone = Backbone.build(checkpoint_backbone(args.checkpoint))
    method = load_checkpoint(Path(args.checkpoint), backbone)
    keys, _, images, _, labels = test_set(args.data, backbone.image_size)
    features = cached_features(backbone, images, args.data, Path(args.features_cache) if args.features_cache else None,
                               "test features")
    (category,) = find_categories(args.data)
    method.prepare(category.name)
    anchors = method.anchors.stacked()
    with torch.no_grad():
        alpha, score, _, z = method.image_outputs(features, anchors.expand(len(keys), -1, -1), patches=False)
    z = F.normalize(z, dim=-1)
    labels = torch.as_tensor(labels)
    print(f"branches {method.branches}; t0 . t1 = {float(anchors[0] @ anchors[1]):.3f}")
    print("alpha mean " + ", ".join(f"{a:.3f}" for a in alpha.mean(0).tolist())
          + f"; range {alpha.min():.3f}-{alpha.max():.3f}; std over images "
          + ", ".join(f"{s:.4f}" for s in alpha.std(0).tolist()))
    pairs = [(i, j) for i in range(z.shape[1]) for j in range(i + 1, z.shape[1])]
    print("cos between branch embeddings " + ", ".join(
        f"{method.branches[i]}-{method.branches[j]} {float((z[:, i] * z[:, j]).sum(-1).mean()):.3f}" for i, j in pairs))
    print(f"score mean normal {float(score[labels == 0].mean()):.4f}, anomalous {float(score[labels == 1].mean()):.4f}; "
          f"std {float(score.std()):.4f}")


if __name__ == "__main__":
    main()
