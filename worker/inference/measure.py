"""Measurements of a pneumothorax mask on a projection radiograph: side, largest gap, hemithorax fraction.

- **Side.** Patient Orientation (0020,0020) names the patient direction of increasing column
  ("L": toward the patient's left, the usual display of a PA or AP chest). The mask's pixels are
  split at the midline between the lung fields (the image centre when they cannot be found). An
  image without Patient Orientation is read in the usual display convention and the finding says
  the side was assumed. A lateral view (orientation A/P) has no left/right.
- **Largest pleural gap.** The diameter of the largest disc that fits in the mask (twice the
  maximum of its Euclidean distance transform): the widest separation between the chest wall and
  the lung edge, the quantity size estimates of a pneumothorax are based on. In pixels, and in mm
  at the patient when the image has a usable spacing.
- **Fraction of the hemithorax.** The mask's area over the area of the affected hemithorax, which
  is estimated without a model: the lung fields are the large dark regions inside the body (Otsu
  threshold of the displayed image, inside the body's outline less a margin, the two largest
  regions, holes filled), and the hemithorax is the lung field on that side together with the mask. It is an
  estimate, reported as such, and left out when no lung field is found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pydicom
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk
from skimage.transform import resize

__all__ = ["MaskMeasurements", "measure_mask", "lung_fields"]

BILATERAL_SHARE = 0.15
"""A side holding at least this share of the mask's area makes the finding bilateral."""
LUNG_FIELD_WORKING_SIZE = 256
"""Lung fields are estimated on a copy whose long side is this many pixels."""
BODY_MARGIN = 8
"""Margin (in working-size pixels) inside the body's outline where no lung field is looked for."""
OPENING_RADIUS = 4
"""Radius (in working-size pixels) of the opening that cuts thin dark bridges."""
MIN_LUNG_SHARE = 0.02
"""A dark region smaller than this share of the image is not a lung field."""


@dataclass(frozen=True)
class MaskMeasurements:
    side: str | None
    side_assumed: bool
    gap_px: float | None
    gap_mm: float | None
    hemithorax_fraction: float | None


def column_direction(source: pydicom.Dataset) -> tuple[int | None, bool]:
    """+1 when columns increase toward the patient's left, -1 toward the right, None when the image
    cannot tell (a lateral view); the second value is True when the convention was assumed."""
    orientation = source.get("PatientOrientation")
    values = [str(v).strip().upper() for v in orientation] if orientation else []
    if len(values) == 2 and values[0]:
        first = values[0][0]
        if first == "L":
            return 1, False
        if first == "R":
            return -1, False
        return None, False
    return 1, True


def lung_fields(image: np.ndarray) -> np.ndarray | None:
    """Estimated lung fields of a displayed radiograph (bright = dense), or None when none is found."""
    rows, columns = image.shape
    scale = LUNG_FIELD_WORKING_SIZE / max(rows, columns)
    small_shape = (max(8, round(rows * scale)), max(8, round(columns * scale)))
    small = resize(image.astype(np.float32), small_shape, anti_aliasing=True, preserve_range=True)
    small = ndimage.gaussian_filter(small, 1.5)
    if float(small.max() - small.min()) < 1e-6:
        return None
    threshold = threshold_otsu(small)
    dark = small < threshold
    # The air around the body is darker still; the lungs are the dark regions well inside the
    # body (eroded by a margin, for the ramp at its edge), cut from thin dark bridges by an opening.
    body = ndimage.binary_fill_holes(small >= threshold_otsu(small[dark]))
    inner = ndimage.binary_erosion(body, structure=disk(BODY_MARGIN), border_value=0)
    dark = ndimage.binary_opening(dark & inner, structure=disk(OPENING_RADIUS))
    labels, count = ndimage.label(dark)
    if count == 0:
        return None
    areas = ndimage.sum_labels(dark, labels, index=np.arange(1, count + 1))
    keep = [i + 1 for i in np.argsort(areas)[::-1][:2] if areas[i] >= MIN_LUNG_SHARE * dark.size]
    if not keep:
        return None
    fields = ndimage.binary_fill_holes(np.isin(labels, keep))
    return resize(fields.astype(np.float32), (rows, columns), order=0) >= 0.5


def _midline(fields: np.ndarray | None, columns: int) -> float:
    """Column between the two lung fields; the image centre when there are not two."""
    if fields is not None:
        labels, count = ndimage.label(fields)
        if count >= 2:
            areas = ndimage.sum_labels(fields, labels, index=np.arange(1, count + 1))
            two = np.argsort(areas)[::-1][:2] + 1
            centres = [ndimage.center_of_mass(labels == label)[1] for label in two]
            return float(np.mean(centres))
    return (columns - 1) / 2.0


def largest_gap(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> tuple[float | None, float | None]:
    """(pixels, mm) diameter of the largest disc inside ``mask``; (None, None) for an empty mask."""
    if not mask.any():
        return None, None
    row_index, column_index = np.nonzero(mask)
    crop = np.pad(mask[row_index.min() : row_index.max() + 1, column_index.min() : column_index.max() + 1], 1)
    gap_px = 2.0 * float(ndimage.distance_transform_edt(crop).max())
    gap_mm = None
    if spacing_mm is not None:
        gap_mm = 2.0 * float(ndimage.distance_transform_edt(crop, sampling=spacing_mm).max())
    return gap_px, gap_mm


def measure_mask(
    mask: np.ndarray, image: np.ndarray, source: pydicom.Dataset, spacing_mm: tuple[float, float] | None
) -> MaskMeasurements:
    """Side, largest gap and hemithorax fraction of ``mask`` on ``image`` (both in the source grid)."""
    if not mask.any():
        return MaskMeasurements(None, False, None, None, None)
    gap_px, gap_mm = largest_gap(mask, spacing_mm)
    fields = lung_fields(image)
    columns = mask.shape[1]
    midline = _midline(fields, columns)
    on_high_side = np.zeros(mask.shape, dtype=bool)
    on_high_side[:, int(np.ceil(midline)) :] = True
    area = float(mask.sum())
    high_share = float((mask & on_high_side).sum()) / area

    direction, assumed = column_direction(source)
    if direction is None:
        side = None
        affected = np.ones(mask.shape, dtype=bool)
    elif min(high_share, 1.0 - high_share) >= BILATERAL_SHARE:
        side = "bilateral"
        affected = np.ones(mask.shape, dtype=bool)
    else:
        high_is_left = direction > 0
        side = "left" if (high_share >= 0.5) == high_is_left else "right"
        affected = on_high_side if high_share >= 0.5 else ~on_high_side

    fraction = None
    if fields is not None:
        hemithorax = (fields | mask) & affected
        if (fields & affected & ~mask).any():
            fraction = min(1.0, float((mask & affected).sum()) / float(hemithorax.sum()))
    return MaskMeasurements(side, assumed and side is not None, gap_px, gap_mm, fraction)
