"""MadCLIP (``madclip``): dual normal/abnormal adapters with detection and segmentation heads,
learnable prompts, SigLIP. Glue in ``method.py``, layers in ``model.py``; paper, choices,
deviations and measurements in ``README.md``."""

from .method import PLACEHOLDER, PLACEMENTS, MadCLIP, placement_order
from .model import BranchAdapter, abnormal_map, dual_scores

__all__ = ["PLACEHOLDER", "PLACEMENTS", "BranchAdapter", "MadCLIP", "abnormal_map", "dual_scores", "placement_order"]
