"""BAG-CLIP (``bag-clip``), the power-line paper: SAFR-recalibrated multi-level details, a kNN
graph over the patches (SAG), joint fusion (JFF). Glue in ``method.py``, the trained parts in
``model.py``; paper, choices, deviations and measurements in ``README.md``."""

from .method import BagCLIP
from .model import (
    BagClipModel,
    GraphConvolution,
    SqueezeExcitation,
    abnormal_share,
    knn_affinities,
    normalised_adjacency,
    resolve_neighbours,
)

__all__ = ["BagCLIP", "BagClipModel", "GraphConvolution", "SqueezeExcitation", "abnormal_share", "knn_affinities",
           "normalised_adjacency", "resolve_neighbours"]
