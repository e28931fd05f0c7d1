"""CoRe-CLIP (``core-clip``): subject / context / global residual branches fused by
text-conditioned attention, for context anomalies. Glue in ``method.py``, layers and losses in
``model.py`` (AA-CLIP's adapter forms and anchors from ``scoring/components/``); paper,
choices, deviations, the generated context set and measurements in ``README.md``."""

from .method import FUSIONS, LOSS_WEIGHTS, CoReCLIP
from .model import BRANCHES, ContextBranches, GatedResidualAdapter, TextConditionedFusion

__all__ = ["BRANCHES", "FUSIONS", "LOSS_WEIGHTS", "ContextBranches", "CoReCLIP", "GatedResidualAdapter",
           "TextConditionedFusion"]
