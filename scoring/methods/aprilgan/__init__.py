"""APRIL-GAN (``aprilgan``): multi-level patch tokens through trainable per-level projections
against the text anchors; few-shot adds the patch memory. Glue in ``method.py``; paper,
choices and deviations in ``README.md``."""

from .method import AprilGAN

__all__ = ["AprilGAN"]
