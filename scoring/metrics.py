"""Anomaly-detection metrics as MVTec-AD-style papers report them.

Pure numpy (+ cv2 for connected components); no I/O, no sklearn at runtime.

Conventions:
* Every curve is exact: scores are sorted once (O(n log n)) and every distinct
  score is a threshold. Tied scores form a single threshold step, exactly as
  sklearn's ``roc_curve`` / ``precision_recall_curve`` do, so AUROC and AP equal
  ``roc_auc_score`` / ``average_precision_score``.
* Single-class input returns ``nan`` instead of raising: an all-good category
  (or a batch without defects) then shows up as ``nan`` in a report rather than
  crashing the whole evaluation. Use ``np.nanmean`` when averaging categories.
* NaN scores raise ``ValueError`` (they would silently sort to one end).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["auroc", "average_precision", "f1_max", "aupro", "image_metrics", "pixel_metrics"]


def _np(x) -> np.ndarray:
    # Accept torch tensors without importing torch here.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _scores(x) -> np.ndarray:
    s = _np(x).ravel()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s


def _desc_steps(scores: np.ndarray):
    """Descending sort order and the index of the last element of each tie group."""
    order = np.argsort(scores)[::-1]  # order inside a tie group is irrelevant
    s = scores[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    return order, last


def _binary_curve(labels, scores):
    """(tps, fps, n_pos, n_neg) at every distinct threshold, high to low.

    Returns None if labels hold a single class (all three metrics undefined).
    """
    y, s = _np(labels).ravel().astype(bool), _scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order, last = _desc_steps(s)
    tps = np.cumsum(y[order], dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, n_pos, n_neg


def _auroc(c) -> float:
    tps, fps, p, n = c
    tpr = np.r_[0.0, tps / p]  # the curve starts at (0, 0): nothing predicted
    fpr = np.r_[0.0, fps / n]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def _ap(c) -> float:
    # Step-wise sum (no interpolation), as sklearn: sum_k (R_k - R_{k-1}) P_k.
    tps, fps, p, _ = c
    recall = np.r_[0.0, tps / p]
    return float(np.sum(np.diff(recall) * (tps / (tps + fps))))


def _f1_max(c) -> float:
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P)
    tps, fps, p, _ = c
    return float(np.max(2 * tps / (tps + fps + p)))


def _nan_or(fn, c) -> float:
    return float("nan") if c is None else fn(c)


def auroc(labels, scores) -> float:
    """Area under the ROC curve; nan if labels hold a single class."""
    return _nan_or(_auroc, _binary_curve(labels, scores))


def average_precision(labels, scores) -> float:
    """Average precision (sklearn definition); nan if labels hold a single class."""
    return _nan_or(_ap, _binary_curve(labels, scores))


def f1_max(labels, scores) -> float:
    """Best F1 over all thresholds; nan if labels hold a single class."""
    return _nan_or(_f1_max, _binary_curve(labels, scores))


def _as_stack(x) -> np.ndarray:
    a = _np(x)
    return a[None] if a.ndim == 2 else a  # a single [H, W] image is allowed


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Bergmann et al. (MVTec AD): PRO(t) is the mean, over all 8-connected
    ground-truth regions of all images, of the fraction of the region predicted
    anomalous (map >= t); FPR(t) is the fraction of all normal pixels predicted
    anomalous. Exact: every distinct map value is a threshold. The curve is
    integrated with the trapezoid rule from FPR 0 to ``fpr_limit`` (interpolated
    at the limit) and divided by ``fpr_limit``, so a perfect map scores 1.0.
    Returns nan when there is no anomalous region (or no normal pixel).
    masks: [N, H, W] bool/0-1; maps: [N, H, W] float.
    """
    masks, maps = _as_stack(masks).astype(bool), _as_stack(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be [N, H, W]")
    if not 0 < fpr_limit <= 1:
        raise ValueError("fpr_limit must be in (0, 1]")

    # Global region id per pixel (0 = normal), offset per image so ids are unique.
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, m in enumerate(masks):
        if m.any():
            k, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
            regions[i] = np.where(lab > 0, lab + n_regions, 0)
            n_regions += k - 1
    n_normal = int(np.count_nonzero(~masks))
    if n_regions == 0 or n_normal == 0:
        return float("nan")

    # Each pixel moves exactly one curve coordinate when the threshold passes it:
    # a normal pixel FPR by 1/n_normal, a region pixel PRO by 1/(|region| * n_regions).
    regions = regions.ravel()
    sizes = np.bincount(regions)
    w_pro = 1.0 / (np.maximum(sizes, 1) * n_regions)
    w_pro[0] = 0.0
    order, last = _desc_steps(_scores(maps))
    r = regions[order]
    fpr = np.cumsum(r == 0, dtype=np.int64)[last] / n_normal
    pro = np.minimum(np.cumsum(w_pro[r])[last], 1.0)  # clip float round-off
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]

    # Keep points with FPR <= limit and add one interpolated exactly at the limit.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:k], pro[:k]
    if x[-1] < fpr_limit and k < fpr.size:
        t = (fpr_limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x, y = np.r_[x, fpr_limit], np.r_[y, pro[k - 1] + t * (pro[k] - pro[k - 1])]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2 / fpr_limit)


def image_metrics(labels, scores) -> dict:
    """Image-level AUROC / AP / F1-max from one sort; nan values if single-class."""
    c = _binary_curve(labels, scores)
    return {"image_auroc": _nan_or(_auroc, c), "image_ap": _nan_or(_ap, c),
            "image_f1_max": _nan_or(_f1_max, c)}


def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict:
    """Pixel-level AUROC / AP / F1-max (pooled over all images) and AUPRO."""
    c = _binary_curve(masks, maps)
    return {"pixel_auroc": _nan_or(_auroc, c), "pixel_ap": _nan_or(_ap, c),
            "pixel_f1_max": _nan_or(_f1_max, c), "aupro": aupro(masks, maps, fpr_limit)}
