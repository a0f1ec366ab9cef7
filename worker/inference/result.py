"""What the inference step hands to the result writers, for one source image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageFinding:
    """The model's answer for one image, in the source image's own pixel grid."""

    probability: float
    """Classifier probability of pneumothorax, 0..1."""
    threshold: float
    """The bundle's probability threshold the decision was taken with."""
    flagged: bool
    """The decision: suspected pneumothorax (classifier and mask agree, mask large enough)."""
    mask: np.ndarray
    """Boolean mask, shape (Rows, Columns) of the source image."""
    area_px: int
    area_cm2: float | None
    """None when the image carries no usable pixel spacing."""
