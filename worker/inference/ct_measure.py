"""Post-processing and measurement of a CT pneumothorax mask, in 3D.

The U-Net sees one slice at a time; the volume is cleaned here as a whole:

- the pleural space is estimated from the HU volume: per slice, the body (tissue above -500 HU)
  with its holes filled, minus the tissue itself, leaves the air- and lung-filled cavity inside
  the chest wall (outside air and the air of the table never qualify);
- connected components of the mask (3D, face, edge and corner neighbours) are kept when most of
  their voxels lie in that cavity and their volume reaches the bundle's minimum (``min_volume_ml``);
- the volume is the kept voxels times the voxel volume (pixel spacing x the spacing between slice
  positions, not Slice Thickness, which may overlap);
- the side is the patient's (LPS x below the body's midline is the patient's right);
- the fraction of the hemithorax is the volume over that side's cavity volume.

SciPy's ``ndimage`` does the labelling, hole filling and dilation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from contract.ct_preprocess import SeriesGeometry

__all__ = ["BODY_HU", "SeriesFinding", "clean_mask", "measure_series", "pleural_space"]

BODY_HU = -500.0
"""Voxels above this are tissue (chest wall, mediastinum); below, air or lung."""
_INSIDE_SHARE = 0.5
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass
class SeriesFinding:
    """The model's answer for one CT series, on the series' own voxel grid (slices by position)."""

    mask: np.ndarray
    """Cleaned boolean mask (slices, rows, columns)."""
    probability: float
    """Largest voxel probability in the pleural space, 0..1."""
    threshold: float
    """The bundle's mask threshold."""
    flagged: bool
    volume_ml: float
    side: str | None
    """"right", "left" or "bilateral" (the patient's), None when nothing is flagged."""
    hemithorax_fraction: float | None
    components: int
    removed_components: int
    """Components dropped: outside the pleural space or below the minimum volume."""


def pleural_space(hu: np.ndarray) -> np.ndarray:
    """The air/lung cavity inside the chest wall, bool (slices, rows, columns)."""
    tissue = hu > BODY_HU
    cavity = np.zeros(hu.shape, dtype=bool)
    for index, section in enumerate(tissue):
        cavity[index] = ndimage.binary_fill_holes(section) & ~section
    return cavity


def clean_mask(
    mask: np.ndarray, cavity: np.ndarray, voxel_volume_ml: float, min_volume_ml: float
) -> tuple[np.ndarray, int, int]:
    """Keep the 3D components mostly inside ``cavity`` and at least ``min_volume_ml``:
    (cleaned mask, components kept, components removed)."""
    labels, count = ndimage.label(mask, structure=_FULL_CONNECTIVITY)
    if count == 0:
        return np.zeros_like(mask, dtype=bool), 0, 0
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    # One voxel of slack at the wall: the mask's rim may touch the chest wall's first voxels.
    near_cavity = ndimage.binary_dilation(cavity, structure=_FULL_CONNECTIVITY)
    inside = np.bincount(labels[near_cavity].ravel(), minlength=count + 1)
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = (inside[1:] >= _INSIDE_SHARE * sizes[1:]) & (sizes[1:] * voxel_volume_ml >= min_volume_ml)
    kept = int(keep.sum())
    return keep[labels], kept, count - kept


def measure_series(
    probabilities: np.ndarray,
    hu: np.ndarray,
    geometry: SeriesGeometry,
    *,
    mask_threshold: float,
    min_volume_ml: float,
) -> SeriesFinding:
    """Threshold, clean and measure the probability volume (slices, rows, columns) of a series."""
    cavity = pleural_space(hu)
    raw = probabilities >= mask_threshold
    mask, kept, removed = clean_mask(raw, cavity, geometry.voxel_volume_ml, min_volume_ml)
    probability = float(probabilities[cavity].max()) if cavity.any() else float(probabilities.max(initial=0.0))
    volume = float(mask.sum()) * geometry.voxel_volume_ml
    side, fraction = None, None
    if kept:
        side, fraction = _side_and_fraction(mask, cavity, hu, geometry)
    return SeriesFinding(
        mask=mask,
        probability=probability,
        threshold=mask_threshold,
        flagged=kept > 0,
        volume_ml=volume,
        side=side,
        hemithorax_fraction=fraction,
        components=kept,
        removed_components=removed,
    )


def _side_and_fraction(
    mask: np.ndarray, cavity: np.ndarray, hu: np.ndarray, geometry: SeriesGeometry
) -> tuple[str, float | None]:
    """The patient's side of the mask and its share of that hemithorax's cavity."""
    body = np.argwhere(hu > BODY_HU)
    midline = float(np.mean(geometry.patient_x(body[:, 1], body[:, 2]))) if len(body) else 0.0
    slice_rows = np.arange(geometry.rows)[:, None].repeat(geometry.columns, axis=1)
    slice_columns = np.arange(geometry.columns)[None, :].repeat(geometry.rows, axis=0)
    right_of_patient = geometry.patient_x(slice_rows, slice_columns) < midline  # LPS: -x is the patient's right
    in_right = int((mask & right_of_patient[None]).sum())
    in_left = int(mask.sum()) - in_right
    if in_right and in_left and min(in_right, in_left) >= 0.1 * max(in_right, in_left):
        side, region = "bilateral", np.ones_like(right_of_patient)
    elif in_right >= in_left:
        side, region = "right", right_of_patient
    else:
        side, region = "left", ~right_of_patient
    hemithorax = int((cavity & region[None]).sum())
    if hemithorax == 0:
        return side, None
    return side, min(1.0, float(mask.sum()) / hemithorax)
