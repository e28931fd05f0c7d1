"""WinCLIP / WinCLIP+ (``winclip``): window-level zero-shot text scores, plus a reference
window and patch memory. Glue in ``method.py``; paper, choices and measurements in
``README.md``."""

from .method import WinCLIP, spread_to_patches, window_index

__all__ = ["WinCLIP", "spread_to_patches", "window_index"]
