"""Alert thresholds from normal references alone (no labelled defects needed).

Leave-one-out: each reference is scored against a memory of the others, which is how an
unseen normal frame of the same asset looks to the method. The threshold sits above the
highest of those scores by a margin of their spread, so ordinary variation (pose, light,
a drone's drift) stays below it.
"""

from __future__ import annotations

import torch

from .methods import AnomalyMethod
from .prompts import TextAnchors


@torch.inference_mode()
def leave_one_out_scores(method: AnomalyMethod, class_name: str, references: torch.Tensor,
                         anchors: TextAnchors | None = None) -> torch.Tensor:
    """[k] image scores, each reference scored with the other k-1 as memory. Leaves the method
    prepared with the last subset: call ``prepare`` again with all references afterwards."""
    if len(references) < 2:
        raise ValueError("leave-one-out needs at least 2 reference images")
    anchors = anchors or method.build_anchors(class_name)  # encode the prompts once, not k times
    scores = []
    for i in range(len(references)):
        others = torch.cat([references[:i], references[i + 1:]])
        method.prepare(class_name, reference_images=others, anchors=anchors)
        scores.append(method.score(references[i:i + 1]).image_score.float().cpu())
    return torch.cat(scores)


def reference_threshold(method: AnomalyMethod, class_name: str, references: torch.Tensor,
                        anchors: TextAnchors | None = None, margin: float = 0.5) -> float:
    """max(LOO) + margin * (max(LOO) - min(LOO)), at least 1% above max(LOO)."""
    scores = leave_one_out_scores(method, class_name, references, anchors)
    top, spread = scores.max().item(), (scores.max() - scores.min()).item()
    return top + max(margin * spread, 0.01 * abs(top))
