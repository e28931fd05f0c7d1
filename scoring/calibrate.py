"""Alert thresholds from normal images alone (no labelled defects needed).

- Calibration images (normal, and not in the reference memory): they look to the method as
  unseen normal frames do, so they are the better evidence when there are some.
- Leave-one-out, from the references alone: each reference is scored against a memory of
  the others. With sparse references this overestimates how far a normal frame is from the
  memory (its nearest reference is gone), so the threshold errs high: fewer false alerts,
  weaker defects missed.
Either way the threshold sits a margin above the highest of those scores: a handful of
samples underestimates the highest normal score, and the margin covers ordinary variation
(pose, light, a drone's drift) they did not catch. From leave-one-out: max + ½·(max − min).
From calibration images: max + ¾·(max − median), the width of their upper half: calibration
views are taken between the references, so one of them can nearly repeat a reference and
score about 0, and a margin from the minimum would grow with that one view (on the demo's
generated background it put the threshold above most of the defect's frames). Scores that are all equal (a saturated method:
every score 1.0) place no threshold: a margin over them is either unreachable or meaningless,
so that is refused with the reason (``CalibrationError``) rather than silently never alerting.
"""

from __future__ import annotations

import torch

from .methods import AnomalyMethod
from .methods.base import without_block


class CalibrationError(ValueError):
    """Normal images whose scores cannot place a threshold; the message says what to do."""


@torch.inference_mode()
def leave_one_out_scores(method: AnomalyMethod, references: torch.Tensor) -> torch.Tensor:
    """[k] image scores, each reference scored with the other k-1 as memory. ``method`` is
    prepared with all k ``references``: each reference's rows are taken out of that memory
    (``memory_state``) instead of encoding k memories of k-1 images, so this costs k forward
    passes, not k². The full memory is back in place on return."""
    k = len(references)
    if k < 2:
        raise ValueError("leave-one-out needs at least 2 reference images")
    full, meta = method.memory_state(), method.memory_meta()
    if not full:
        raise ValueError(f"{method.name} holds no reference memory: prepare it with the references first")
    scores = []
    try:
        for i in range(k):
            method.set_memory_state({name: without_block(rows, i, k) for name, rows in full.items()}, meta)
            scores.append(method.score(references[i:i + 1]).image_score.float().cpu())
    finally:
        method.set_memory_state(full, meta)
    return torch.cat(scores)


def reference_threshold(method: AnomalyMethod, references: torch.Tensor, margin: float = 0.5) -> float:
    """max(LOO) + margin * (max(LOO) - min(LOO)), at least 1% above max(LOO); ``method`` is
    prepared with all ``references``."""
    scores = leave_one_out_scores(method, references)
    return _above(scores, margin, "leave-one-out scores of the references")


@torch.inference_mode()
def calibration_threshold(method: AnomalyMethod, images: torch.Tensor, margin: float = 0.75) -> float:
    """max + margin * (max - median) of a prepared method's scores on normal ``images`` not in its memory."""
    scores = torch.cat([method.score(images[i:i + 8]).image_score.float().cpu() for i in range(0, len(images), 8)])
    return _above(scores, margin, "scores of the calibration images", base=scores.median().item())


def _above(scores: torch.Tensor, margin: float, what: str, base: float | None = None) -> float:
    """max + margin * (max - base) (base: the minimum unless given; at least 1 % above max);
    CalibrationError when the scores are all equal."""
    top, bottom = scores.max().item(), scores.min().item()
    if len(scores) > 1 and top == bottom:
        raise CalibrationError(f"the {len(scores)} {what} are all {top:.6g}: the method cannot tell these normal "
                               "images apart (saturated scores), so no threshold above them means anything; use "
                               "other weights, references or method, or set --threshold")
    spread = top - (bottom if base is None else base)
    return top + max(margin * spread, 0.01 * abs(top))
