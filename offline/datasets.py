"""MVTec-AD layout reader: ``<cat>/train/good``, ``<cat>/test/<defect>``,
``<cat>/ground_truth/<defect>/<stem>_mask.png``. Images load through ``scoring.pixels``
(float RGB tensors in [0, 1]); masks as bool tensors at the same size.

Optional subject masks (where the object whose placement is judged is, for methods that learn
context anomalies, CoRe-CLIP): ``<cat>/subject_masks/<split>/<defect>/<stem>_mask.png`` beside
any image, e.g. ``subject_masks/train/good/000_mask.png``. Images without one train without."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import torch

from ..scoring.pixels import IMAGE_SUFFIXES


SUBJECT_MASKS = "subject_masks"


class DatasetError(ValueError):
    """A user-facing problem with a dataset folder or file."""


@dataclass
class Sample:
    path: Path
    defect: str  # "good" for normal images
    mask_path: Path | None = None

    @property
    def label(self) -> int:
        return int(self.defect != "good")


@dataclass
class Category:
    name: str
    root: Path
    train_good: list[Path] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return all(s.mask_path is not None for s in self.test if s.label)

    def subject_mask(self, image: Path) -> Path | None:
        """The image's subject mask under ``subject_masks/``, if there is one."""
        relative = image.relative_to(self.root)
        path = self.root / SUBJECT_MASKS / relative.parent / f"{image.stem}_mask.png"
        return path if path.is_file() else None

    def references(self, shots: int, seed: int) -> list[Path]:
        if shots > len(self.train_good):
            raise DatasetError(f"{self.name}: {shots} shots asked but train/good has {len(self.train_good)} images")
        return random.Random(seed).sample(self.train_good, shots)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def _read_category(root: Path) -> Category:
    category = Category(root.name, root, train_good=_images(root / "train" / "good"))
    for defect_dir in sorted(d for d in (root / "test").iterdir() if d.is_dir()):
        for path in _images(defect_dir):
            mask = root / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
            category.test.append(Sample(path, defect_dir.name, mask if mask.is_file() else None))
    if not category.test:
        raise DatasetError(f"{root}: test/ holds no images")
    return category


def find_categories(root: str | Path) -> list[Category]:
    """``root`` is one category (has test/) or a folder of categories."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if (root / "test").is_dir():
        return [_read_category(root)]
    categories = [_read_category(d) for d in sorted(root.iterdir()) if (d / "test").is_dir()]
    if not categories:
        raise DatasetError(f"{root} is not in MVTec layout: no <category>/test/ folders found")
    return categories


def load_mask(path: Path | None, size: int) -> torch.Tensor:
    """[size, size] bool; all False for a normal image (no mask file)."""
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DatasetError(f"cannot read mask {path}")
    return torch.from_numpy(cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) > 127)
