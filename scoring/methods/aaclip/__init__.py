"""AA-CLIP (``aa-clip``): anomaly-aware text anchors, then patch features aligned to them.
Glue in ``method.py``; its adapters and anchors are shared with CoRe-CLIP
(``scoring/components/``); paper, choices, deviations and measurements in ``README.md``."""

from ...components.adapters import ResidualAdapter, xavier_linear
from ...components.anchors import ensemble_anchor
from .method import AACLIP, abnormal_cosine_score

__all__ = ["AACLIP", "ResidualAdapter", "abnormal_cosine_score", "ensemble_anchor", "xavier_linear"]
