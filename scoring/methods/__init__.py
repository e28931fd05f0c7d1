"""Anomaly-scoring methods, registered by name: ``create_method("winclip", backbone)``."""

from . import aaclip, aprilgan, bagclip, coreclip, kanoclip, madclip, winclip  # noqa: F401  (importing registers them)
from .base import (
    METHODS,
    AnomalyMethod,
    AnomalyScores,
    check_options,
    create_method,
    method_class,
    register_method,
)

__all__ = ["METHODS", "AnomalyMethod", "AnomalyScores", "check_options", "create_method", "method_class", "register_method"]
