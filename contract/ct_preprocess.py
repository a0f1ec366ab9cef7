"""The one CT preprocessing definition, used by training and by the worker alike.

A CT series becomes the network's input in three steps:

1. :func:`series_geometry` orders the slices by their position along the slice normal (Image
   Position Patient projected on the cross product of Image Orientation Patient's rows and
   columns; never Instance Number) and checks that they form one regular volume: one orientation,
   one Frame of Reference, one size and pixel spacing, distinct positions.
2. :func:`slice_hu` converts a slice's stored values to Hounsfield units (Rescale Slope and
   Intercept, through pydicom's Modality LUT) and :func:`window_hu` applies the bundle's HU window
   (level, width), giving 0..1.
3. :func:`ct_network_input` resizes each slice to the bundle's square input and normalises it
   with the radiograph path's own :func:`~contract.preprocess.resize_to_input` and
   :func:`~contract.preprocess.normalise_input`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from config.errors import PleuraError
from contract.bundle import Preprocessing
from contract.preprocess import ImageDecodeError, describe_source, normalise_input, resize_to_input

__all__ = [
    "CT_SOP_CLASSES",
    "SeriesError",
    "SeriesGeometry",
    "ct_network_input",
    "ct_slice_problem",
    "series_geometry",
    "slice_hu",
    "window_hu",
]

CT_SOP_CLASSES = frozenset({pydicom.uid.CTImageStorage, pydicom.uid.EnhancedCTImageStorage})
"""SOP classes the node routes to the CT queue; the CT worker analyses single-frame CT Image Storage."""
_POSITION_TOLERANCE_MM = 1e-3
_ORIENTATION_TOLERANCE = 1e-4


class SeriesError(PleuraError, ValueError):
    """The slices of a series do not form one regular volume; the message says which and why."""


@dataclass(frozen=True)
class SeriesGeometry:
    """A series' voxel grid: slices ordered along ``normal``."""

    order: list[int]
    """Indices into the given datasets, by position along the normal (lowest first)."""
    row_direction: np.ndarray
    """Direction of increasing column index (Image Orientation Patient's first triplet), LPS."""
    column_direction: np.ndarray
    """Direction of increasing row index, LPS."""
    normal: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    """(between rows, between columns)."""
    slice_spacing_mm: float
    """Median distance between consecutive slice positions."""
    origin_mm: np.ndarray
    """Image Position Patient of the first slice in order."""
    frame_of_reference_uid: str
    rows: int
    columns: int

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing_mm[0] * self.pixel_spacing_mm[1] * self.slice_spacing_mm / 1000.0

    def patient_x_of_columns(self) -> np.ndarray:
        """The LPS x (patient's right -, left +) of each column's centre on the first row."""
        columns = np.arange(self.columns, dtype=np.float64)
        return self.origin_mm[0] + columns * self.pixel_spacing_mm[1] * self.row_direction[0]

    def patient_x(self, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The LPS x of voxels at (row, column) (any slice: the slices are parallel)."""
        return (
            self.origin_mm[0]
            + np.asarray(columns, dtype=np.float64) * self.pixel_spacing_mm[1] * self.row_direction[0]
            + np.asarray(rows, dtype=np.float64) * self.pixel_spacing_mm[0] * self.column_direction[0]
        )


def ct_slice_problem(ds: pydicom.Dataset) -> str | None:
    """None when a header is a slice the CT model can analyse, else why not (in words)."""
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality != "CT":
        return f"modality {modality or '(absent)'} is not CT"
    if ds.get("SOPClassUID") != pydicom.uid.CTImageStorage:
        return f"SOP class {ds.get('SOPClassUID')} is not CT Image Storage (multi-frame Enhanced CT is not analysed)"
    if int(ds.get("SamplesPerPixel") or 1) != 1 or int(ds.get("NumberOfFrames") or 1) != 1:
        return "not a single-frame grayscale slice"
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if missing:
        return f"no {', '.join(missing)}: the slice cannot be placed in a volume"
    return None


def _vector(ds: pydicom.Dataset, keyword: str, length: int) -> np.ndarray:
    try:
        values = np.array([float(v) for v in ds[keyword].value], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        values = np.array([])
    if values.shape != (length,) or not np.all(np.isfinite(values)):
        raise SeriesError(f"{describe_source(ds)}: {keyword} {ds.get(keyword)!r} is not {length} numbers")
    return values


def series_geometry(datasets: Sequence[pydicom.Dataset]) -> SeriesGeometry:
    """Order the slices by position and check they form one volume; raises :class:`SeriesError`."""
    if not datasets:
        raise SeriesError("a CT series needs at least one slice")
    first = datasets[0]
    orientation = _vector(first, "ImageOrientationPatient", 6)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise SeriesError(f"{describe_source(first)}: Image Orientation Patient {list(orientation)} is not orthonormal")
    spacing = _vector(first, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise SeriesError(f"{describe_source(first)}: Pixel Spacing {list(spacing)} must be positive")
    frame = str(first.get("FrameOfReferenceUID", ""))
    size = (int(first.Rows), int(first.Columns))
    positions = []
    for ds in datasets:
        where = describe_source(ds)
        if not np.allclose(_vector(ds, "ImageOrientationPatient", 6), orientation, atol=_ORIENTATION_TOLERANCE):
            raise SeriesError(f"{where}: its Image Orientation Patient differs from the series' first slice")
        if not np.allclose(_vector(ds, "PixelSpacing", 2), spacing, rtol=1e-4):
            raise SeriesError(f"{where}: its Pixel Spacing differs from the series' first slice")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise SeriesError(f"{where}: {ds.Rows}x{ds.Columns} pixels, the series' first slice has {size[0]}x{size[1]}")
        if str(ds.get("FrameOfReferenceUID", "")) != frame:
            raise SeriesError(f"{where}: its Frame of Reference UID differs from the series' first slice")
        positions.append(_vector(ds, "ImagePositionPatient", 3))
    along = np.array([float(p @ normal) for p in positions])
    order = [int(i) for i in np.argsort(along, kind="stable")]
    gaps = np.diff(along[order])
    if len(gaps) and np.min(gaps) < _POSITION_TOLERANCE_MM:
        raise SeriesError("two slices of the series share one position (a duplicate or a second acquisition)")
    if len(gaps):
        slice_spacing = float(np.median(gaps))
    else:
        slice_spacing = float(first.get("SliceThickness") or 0) or 1.0
    if len(gaps) and (np.max(gaps) > 1.5 * slice_spacing):
        raise SeriesError(
            f"the slices are not evenly spaced (gaps of {np.min(gaps):.2f} to {np.max(gaps):.2f} mm): "
            "a slice is missing or the series mixes reconstructions"
        )
    return SeriesGeometry(
        order=order,
        row_direction=row_direction,
        column_direction=column_direction,
        normal=normal,
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])),
        slice_spacing_mm=slice_spacing,
        origin_mm=positions[order[0]],
        frame_of_reference_uid=frame,
        rows=size[0],
        columns=size[1],
    )


def slice_hu(ds: pydicom.Dataset) -> np.ndarray:
    """A slice in Hounsfield units, float32 (Rows, Columns): the Modality LUT (Rescale Slope/Intercept)."""
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds: missing data, no decoder, truncated data
        raise ImageDecodeError(f"{describe_source(ds)}: cannot decode the pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise ImageDecodeError(f"{describe_source(ds)}: pixel data has shape {stored.shape}; expected one slice")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def window_hu(hu: np.ndarray, recipe: Preprocessing) -> np.ndarray:
    """HU through the recipe's window (level, width) to 0..1, float32."""
    if recipe.hu_window is None:
        raise ValueError("the preprocessing recipe has no hu_window: it is not a CT recipe")
    level, width = recipe.hu_window
    low = level - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - low) / float(width), 0.0, 1.0)


def ct_network_input(hu_slices: np.ndarray, recipe: Preprocessing) -> np.ndarray:
    """A batch (N, channels, S, S) for the CT network from HU slices (N, Rows, Columns)."""
    return np.stack([normalise_input(resize_to_input(window_hu(hu, recipe), recipe), recipe) for hu in hu_slices])
