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
    """Boolean mask, shape (Rows, Columns) of the source image: the U-Net's outline, or with
    ``region == "gradcam"`` the classifier's Grad-CAM region."""
    area_px: int
    area_cm2: float | None
    """None when the image carries no usable pixel spacing."""
    side: str | None = None
    """"right", "left" or "bilateral" (the patient's side), None when the mask is empty or the
    image's orientation cannot tell (see :mod:`worker.inference.measure`)."""
    side_assumed: bool = False
    """True when the side follows the usual display convention because the image has no
    Patient Orientation."""
    gap_px: float | None = None
    """Largest pleural gap (widest point of the mask) in pixels; None when the mask is empty."""
    gap_mm: float | None = None
    """The same in mm at the patient; None without a usable pixel spacing."""
    hemithorax_fraction: float | None = None
    """Mask area over the estimated area of the affected hemithorax (0..1); None when the lung
    fields cannot be estimated."""
    lung_fields_method: str | None = None
    """How the lung fields of ``hemithorax_fraction`` were found: the threshold estimate or a lung
    segmenter (:mod:`worker.inference.lungs`); None without a fraction."""
    decision: str = ""
    """The rule behind ``flagged`` in words (:func:`~contract.reasons.decision_reason`)."""
    spacing_source: str | None = None
    """Which attributes the mm and cm2 sizes come from (:func:`~worker.inference.predict.physical_spacing`);
    None when the image has no usable spacing."""
    region: str = "outline"
    """What ``mask`` is: "outline" (the U-Net's segmentation, measured, written as a SEG) or
    "gradcam" (a classifier-only bundle: where the classifier looked, drawn as "Grad-CAM region,
    not an outline"; no SEG, no sizes)."""

    @property
    def is_gradcam_region(self) -> bool:
        return self.region == "gradcam"


GRADCAM_REGION_LABEL = "Grad-CAM region, not an outline"
"""How the GSPS and the SC label a classifier-only bundle's region."""
