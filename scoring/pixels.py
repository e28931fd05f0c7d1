"""The pixel contract: how an image becomes a method's input. Eval, training, references,
calibration and the streaming workers all go through these, so a model sees the same pixels
whichever path an image took."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from .options import IMAGE_SUFFIXES  # noqa: E402,F401  (torch-free, for the profiles' early checks)


class ImageError(ValueError):
    """An image file that cannot be read."""


def load_image(path: Path, size: int) -> torch.Tensor:
    """[3, size, size] float RGB in [0, 1]; squashed to a square so masks stay aligned."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"cannot read image {path}")
    return bgr_to_tensor(image, size)


def bgr_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """An OpenCV BGR uint8 image -> [3, size, size] float RGB in [0, 1], squashed to a square."""
    return torch.from_numpy(square_rgb(image, size)).permute(2, 0, 1).float().div_(255.0)


def square_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """An OpenCV BGR uint8 image -> [size, size, 3] uint8 RGB (area filter down, cubic up).
    The workers batch these and convert once (``workers/frames.py``)."""
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC)
    return np.ascontiguousarray(image[:, :, ::-1])
