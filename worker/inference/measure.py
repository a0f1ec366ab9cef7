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
  estimate, reported as such, and left out when no lung field is found. Where a lung segmenter is
  configured (``PLEURA_LUNG_SEGMENTER_WEIGHTS``, :mod:`worker.inference.lungs`), its lung masks are
  the lung fields instead (for the midline too), and the finding names the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk

from contract.preprocess import resize_map

__all__ = ["MaskMeasurements", "bounding_box", "measure_mask", "lung_fields", "small_lung_fields"]

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
    lung_fields_method: str | None = None
    """How the lung fields of ``hemithorax_fraction`` were found (None when there is no fraction)."""


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


def small_lung_fields(image: np.ndarray) -> np.ndarray | None:
    """Estimated lung fields on the working-size copy of ``image`` (see :func:`lung_fields`)."""
    rows, columns = image.shape
    scale = LUNG_FIELD_WORKING_SIZE / max(rows, columns)
    small_shape = (max(8, round(rows * scale)), max(8, round(columns * scale)))
    # The antialiased resize the networks' inputs get (torch's, much faster at 2048 px than
    # scikit-image's Gaussian prefilter and the same low-pass in effect).
    small = resize_map(np.asarray(image, dtype=np.float32), small_shape, antialias=True)
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
    return ndimage.binary_fill_holes(np.isin(labels, keep))


def _to_source_grid(fields: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Working-size fields on the source grid ``shape`` (nearest neighbour)."""
    rows = (np.arange(shape[0]) * fields.shape[0]) // shape[0]
    columns = (np.arange(shape[1]) * fields.shape[1]) // shape[1]
    # One axis at a time: several times faster than indexing with np.ix_ at 2048 px.
    return np.take(np.take(fields, rows, axis=0), columns, axis=1)


def lung_fields(image: np.ndarray) -> np.ndarray | None:
    """Estimated lung fields of a displayed radiograph (bright = dense), or None when none is found."""
    fields = small_lung_fields(image)
    return None if fields is None else _to_source_grid(fields, image.shape)


def _midline(fields: np.ndarray | None, columns: int) -> float:
    """Column between the two lung fields, on a grid of ``columns`` columns (``fields`` may be a
    smaller copy of it); the image centre when there are not two."""
    if fields is not None:
        labels, count = ndimage.label(fields)
        if count >= 2:
            areas = ndimage.sum_labels(fields, labels, index=np.arange(1, count + 1))
            two = np.argsort(areas)[::-1][:2] + 1
            centres = ndimage.center_of_mass(fields, labels, two)
            centre = float(np.mean([column for _, column in centres]))
            scale = columns / fields.shape[1]  # pixel centres: (c + 0.5) * scale - 0.5
            return (centre + 0.5) * scale - 0.5
    return (columns - 1) / 2.0


def largest_gap(mask: np.ndarray, spacing_mm: tuple[float, float] | None) -> tuple[float | None, float | None]:
    """(pixels, mm) diameter of the largest disc inside ``mask``; (None, None) for an empty mask."""
    if not mask.any():
        return None, None
    crop = np.pad(mask[bounding_box(mask)], 1)
    gap_px = 2.0 * float(ndimage.distance_transform_edt(crop).max())
    gap_mm = None
    if spacing_mm is not None:
        if spacing_mm[0] == spacing_mm[1]:  # square pixels: the same disc, scaled
            gap_mm = gap_px * spacing_mm[0]
        else:
            gap_mm = 2.0 * float(ndimage.distance_transform_edt(crop, sampling=spacing_mm).max())
    return gap_px, gap_mm


def bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    """The smallest (rows, columns) slices holding every set pixel of a non-empty 2-D ``mask``
    (two reductions along the axes instead of the coordinates of every pixel)."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


THRESHOLD_ESTIMATE = "lung fields estimated by a threshold (no model)"


def measure_mask(
    mask: np.ndarray, image: np.ndarray, source: pydicom.Dataset, spacing_mm: tuple[float, float] | None,
    segment_lungs: Callable[[np.ndarray], np.ndarray | None] | None = None, lungs_method: str | None = None,
) -> MaskMeasurements:
    """Side, largest gap and hemithorax fraction of ``mask`` on ``image`` (both in the source grid).

    ``segment_lungs``: the lung fields of ``image`` on a smaller grid of its aspect (a lung
    segmenter, named by ``lungs_method``), in place of the threshold estimate."""
    if not mask.any():
        return MaskMeasurements(None, False, None, None, None)
    gap_px, gap_mm = largest_gap(mask, spacing_mm)
    if segment_lungs is not None:
        small_fields, method = segment_lungs(image), lungs_method or "a lung segmenter"
    else:
        small_fields, method = small_lung_fields(image), THRESHOLD_ESTIMATE
    columns = mask.shape[1]
    midline = _midline(small_fields, columns)
    # The two sides are column ranges: measured on slices, not on image-sized masks.
    split = max(0, int(np.ceil(midline)))
    area = float(mask.sum())
    high_share = float(mask[:, split:].sum()) / area

    direction, assumed = column_direction(source)
    affected = slice(None)  # the columns of the affected hemithorax
    if direction is None:
        side = None
    elif min(high_share, 1.0 - high_share) >= BILATERAL_SHARE:
        side = "bilateral"
    else:
        high_is_left = direction > 0
        side = "left" if (high_share >= 0.5) == high_is_left else "right"
        affected = slice(split, None) if high_share >= 0.5 else slice(0, split)

    fraction = None
    if small_fields is not None:
        fields = _to_source_grid(small_fields, mask.shape)[:, affected]
        lesion = mask[:, affected]
        if (fields & ~lesion).any():
            fraction = min(1.0, float(lesion.sum()) / float((fields | lesion).sum()))
    return MaskMeasurements(side, assumed and side is not None, gap_px, gap_mm, fraction,
                            method if fraction is not None else None)
