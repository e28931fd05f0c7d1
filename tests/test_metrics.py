import math

import cv2
import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from linewatch.scoring.metrics import (
    aupro,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
    pixel_metrics,
)


def _random_cases():
    rng = np.random.default_rng(0)
    for n, decimals in [(50, None), (500, 1), (2000, 2), (3000, 0), (5000, None)]:
        y = rng.random(n) < 0.3
        s = rng.normal(size=n) + 0.8 * y
        if decimals is not None:  # heavy ties, including ties across classes
            s = np.round(s, decimals)
        yield y, s.astype(np.float32)


@pytest.mark.parametrize("y,s", list(_random_cases()))
def test_auroc_ap_match_sklearn(y, s):
    assert auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-9)
    assert average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-9)


def _f1_max_brute(y, s):
    # Independent: predict s >= t for every unique threshold, score with sklearn.
    return max(sk.f1_score(y, s >= t) for t in np.unique(s))


@pytest.mark.parametrize("y,s", [c for c in _random_cases() if c[0].size <= 2000])
def test_f1_max_brute_force(y, s):
    assert f1_max(y, s) == pytest.approx(_f1_max_brute(y, s), abs=1e-12)


def test_all_tied_scores():
    y = np.array([0, 1, 0, 1, 1], bool)
    s = np.zeros(5, np.float32)
    assert auroc(y, s) == pytest.approx(0.5)
    assert average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s))
    assert f1_max(y, s) == pytest.approx(2 * 3 / (5 + 3))


@pytest.mark.parametrize("y", [np.zeros(10, bool), np.ones(10, bool)])
def test_single_class_is_nan(y):
    s = np.linspace(0, 1, 10)
    for f in (auroc, average_precision, f1_max):
        assert math.isnan(f(y, s))
    assert all(math.isnan(v) for v in image_metrics(y, s).values())


def test_nan_scores_rejected():
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, float("nan")])


# --------------------------------------------------------------------- AUPRO

def _hand_case():
    # Image A: the top two rows form region R1 (8 px). Image B: a 2x2 block R2 (4 px).
    # 2 regions, 32 - 12 = 20 normal pixels, so one normal pixel moves FPR by 0.05.
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2, :] = True
    masks[1, 2:, 2:] = True
    maps = np.zeros((2, 4, 4))
    maps[1, 2:, 2:] = 0.9      # all of R2
    maps[0, 0, :] = 0.8        # half of R1 ...
    maps[0, 2, :2] = 0.8       # ... plus 2 normal pixels
    maps[0, 1, :] = 0.7        # rest of R1 ...
    maps[0, 2, 2:] = 0.7       # ... plus 8 normal pixels (2 + 6)
    maps[0, 3, :] = 0.7
    maps[1, 0, :2] = 0.7
    # Remaining 10 normal pixels stay at 0.0.
    #   t    PRO              FPR
    #  0.9   (0 + 1)/2 = .5    0/20 = 0
    #  0.8   (.5 + 1)/2 = .75  2/20 = .1
    #  0.7   (1 + 1)/2 = 1    10/20 = .5
    #  0.0   1                20/20 = 1
    # Curve (0,0) (0,.5) (.1,.75) (.5,1) (1,1). PRO at FPR .3 = .75 + .25 * (.2/.4) = .875.
    # Area to .3 = .1 * (.5 + .75)/2 + .2 * (.75 + .875)/2 = .0625 + .1625 = .225
    # AUPRO = .225 / .3 = .75.  With fpr_limit=1: .0625 + .4 * 1.75/2 + .5 * 1 = .9125.
    return masks, maps


def test_aupro_hand_case():
    masks, maps = _hand_case()
    assert (~masks).sum() == 20
    assert aupro(masks, maps) == pytest.approx(0.75, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.9125, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(0.0625 / 0.1, abs=1e-12)


def test_aupro_uses_8_connectivity():
    # (0,0) and (1,1) touch diagonally: one region under 8-connectivity, plus (3,3).
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    amap = np.full((4, 4), 0.7)   # all 13 normal pixels enter together: FPR 0 -> 1
    amap[0, 0] = 0.9              # first step: PRO = (1/2 + 0) / 2 = 0.25 at FPR 0
    amap[1, 1] = amap[3, 3] = 0.5
    # Curve (0,0) (0,.25) (1,.25) (1,1): AUPRO = .25 (4-connectivity would give 1/3).
    assert aupro(mask[None], amap[None]) == pytest.approx(0.25, abs=1e-12)
    assert aupro(mask, amap) == pytest.approx(0.25, abs=1e-12)  # single [H, W] image


def _random_masks_maps(seed, n=3, h=12, w=12, decimals=None):
    rng = np.random.default_rng(seed)
    blobs = cv2.GaussianBlur(rng.random((n, h, w)).transpose(1, 2, 0), (5, 5), 0)
    masks = blobs.transpose(2, 0, 1) > 0.55
    masks[0] = False  # one defect-free image
    maps = masks * 0.3 + rng.random((n, h, w))
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


def test_aupro_perfect_and_inverted():
    masks, maps = _random_masks_maps(1)
    assert masks.any()
    sep = masks * 10.0 + maps  # every anomalous pixel above every normal one
    assert aupro(masks, sep) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, -sep) == pytest.approx(0.0, abs=1e-12)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0, abs=1e-12)


def test_aupro_monotonic_invariance():
    masks, maps = _random_masks_maps(2)
    ref = aupro(masks, maps)
    assert aupro(masks, np.exp(3 * maps) - 5) == pytest.approx(ref, abs=1e-12)
    assert aupro(masks, maps.argsort(None).argsort().reshape(maps.shape)) == pytest.approx(ref, abs=1e-12)


def test_aupro_no_regions_is_nan():
    assert math.isnan(aupro(np.zeros((2, 4, 4), bool), np.random.rand(2, 4, 4)))


def _aupro_reference(masks, maps, fpr_limit=0.3):
    """Slow, independent: loop over every unique threshold, recount the regions."""
    regions = []
    for m, a in zip(masks, maps):
        k, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [(a, lab == r) for r in range(1, k)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(((maps >= t) & normal).sum() / normal.sum())
        ys.append(np.mean([(a[r] >= t).mean() for a, r in regions]))
    area = 0.0  # trapezoids, each clipped to [0, fpr_limit]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 < fpr_limit and x1 > x0:
            xe = min(x1, fpr_limit)
            ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0)
            area += (xe - x0) * (y0 + ye) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed,decimals,limit", [(3, None, 0.3), (4, 1, 0.3), (5, 2, 0.3),
                                                 (6, None, 1.0), (7, 1, 0.05)])
def test_aupro_matches_reference(seed, decimals, limit):
    masks, maps = _random_masks_maps(seed, decimals=decimals)
    assert masks.any()
    assert aupro(masks, maps, limit) == pytest.approx(_aupro_reference(masks, maps, limit), abs=1e-6)


def test_aupro_reference_on_hand_case():
    masks, maps = _hand_case()
    assert _aupro_reference(masks, maps) == pytest.approx(0.75, abs=1e-12)


# ------------------------------------------------------------------ wrappers

def test_wrappers_keys_and_torch_input():
    torch = pytest.importorskip("torch")
    masks, maps = _random_masks_maps(8)
    pm = pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps).float())
    assert set(pm) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    y, s = masks.ravel(), maps.astype(np.float32).ravel()
    assert pm["pixel_auroc"] == pytest.approx(sk.roc_auc_score(y, s), abs=1e-9)
    assert pm["pixel_ap"] == pytest.approx(sk.average_precision_score(y, s), abs=1e-9)
    assert pm["pixel_f1_max"] == pytest.approx(f1_max(y, s), abs=1e-12)
    assert pm["aupro"] == pytest.approx(aupro(masks, maps.astype(np.float32)), abs=1e-12)

    labels = torch.tensor([0, 1, 1, 0, 1])
    scores = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.8], requires_grad=True)
    im = image_metrics(labels, scores)
    assert set(im) == {"image_auroc", "image_ap", "image_f1_max"}
    assert im["image_auroc"] == pytest.approx(sk.roc_auc_score([0, 1, 1, 0, 1], [0.1, 0.9, 0.4, 0.4, 0.8]))
