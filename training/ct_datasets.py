"""CT training data: series in DICOM with ground-truth masks as DICOM SEG or NIfTI.

Layout, one folder per case (a case is one CT series)::

    DATA/<case>/series/*.dcm              the CT slices (any file names; ordered by position)
    DATA/<case>/segmentation.dcm          the truth as a DICOM SEG (3D Slicer's export), or
    DATA/<case>/segmentation.nii.gz       the truth as a NIfTI label map (.nii also), non-zero = pneumothorax

A SEG must reference the series' slices; with several segments, those whose label or segmented
property names a pneumothorax are used (all of them when it has a single segment). A NIfTI must
lie on the series' own voxel grid (any axis order or flip, as dcm2niix or Slicer write it): its
affine is compared with the one the DICOM geometry gives, and a mask on another grid is refused
with the fix (resample it to the series).

Bad input stops :func:`read_ct_dataset` with a :class:`~training.datasets.DatasetError` naming the
case folder and what is missing, or with ``skip_bad`` leaves the case out and records a
:class:`~training.datasets.Problem`; :func:`load_case` raises ``DatasetError`` for a mask or series
that cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from contract.ct_preprocess import SeriesError, SeriesGeometry, ct_slice_problem, series_geometry, slice_hu
from contract.preprocess import ImageDecodeError
from training.datasets import DatasetError, Problem
from training.synthetic import SYNTHETIC_PATIENT_NAME
from training.ct_synthetic import affine_from_geometry

__all__ = ["CTCase", "CTDatasetIndex", "LoadedCase", "load_case", "nifti_on_series_grid", "read_ct_dataset"]

SERIES_DIR = "series"
SEG_NAMES = ("segmentation.dcm",)
NIFTI_NAMES = ("segmentation.nii.gz", "segmentation.nii")


@dataclass(frozen=True)
class CTCase:
    """One CT series with its truth. ``image_id``/``patient_id``/``positive`` let the radiograph
    split functions (:mod:`training.splits`) split cases by patient."""

    case_id: str
    series_files: tuple[Path, ...]
    mask_path: Path
    mask_format: Literal["seg", "nifti"]
    patient_id: str
    synthetic: bool
    positive: bool = True

    @property
    def image_id(self) -> str:
        return self.case_id


@dataclass
class CTDatasetIndex:
    root: Path
    cases: list[CTCase]
    problems: list[Problem] = field(default_factory=list)

    def describe(self) -> str:
        formats = sorted({case.mask_format for case in self.cases})
        slices = sum(len(case.series_files) for case in self.cases)
        return (
            f"{self.root}: {len(self.cases)} CT series ({slices} slices) of "
            f"{len({c.patient_id for c in self.cases})} patients, masks as {' and '.join(formats) or 'nothing'}"
            + (f"; {len(self.problems)} case(s) left out" if self.problems else "")
        )


@dataclass
class LoadedCase:
    """A case read through the worker's CT preprocessing: slices ordered by position."""

    hu: np.ndarray
    """(slices, rows, columns) float32 Hounsfield units."""
    mask: np.ndarray
    """(slices, rows, columns) bool."""
    geometry: SeriesGeometry
    headers: list[pydicom.Dataset]


def _case(folder: Path) -> CTCase:
    series_dir = folder / SERIES_DIR
    files = tuple(sorted(p for p in series_dir.glob("*") if p.is_file())) if series_dir.is_dir() else ()
    if not files:
        raise DatasetError(f"{folder}: no CT slices in {series_dir} (put the series' DICOM files there)")
    seg = [folder / name for name in SEG_NAMES if (folder / name).is_file()]
    nifti = [folder / name for name in NIFTI_NAMES if (folder / name).is_file()]
    if len(seg) + len(nifti) != 1:
        names = ", ".join(SEG_NAMES + NIFTI_NAMES)
        found = "none" if not seg + nifti else ", ".join(p.name for p in seg + nifti)
        raise DatasetError(f"{folder}: expected exactly one truth mask ({names}), found {found}")
    try:
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise DatasetError(f"{files[0]}: not a readable DICOM file: {exc}") from None
    return CTCase(
        case_id=folder.name,
        series_files=files,
        mask_path=(seg + nifti)[0],
        mask_format="seg" if seg else "nifti",
        patient_id=str(header.get("PatientID") or folder.name),
        synthetic=str(header.get("PatientName", "")) == SYNTHETIC_PATIENT_NAME,
    )


def read_ct_dataset(root: Path | str, *, skip_bad: bool = False) -> CTDatasetIndex:
    """Index the case folders under ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CT data set {root} is not a folder")
    cases, problems = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            cases.append(_case(folder))
        except DatasetError as exc:
            if not skip_bad:
                raise
            problems.append(Problem(folder, None, str(exc)))
    if not cases:
        raise DatasetError(f"{root}: no CT cases (expected <case>/series/*.dcm and <case>/segmentation.dcm or .nii.gz)")
    return CTDatasetIndex(root, cases, problems)


def _seg_mask(path: Path, headers: list[pydicom.Dataset]) -> np.ndarray:
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises several kinds for a file that is not a valid SEG
        raise DatasetError(f"{path}: not a readable DICOM SEG: {exc}") from None
    numbers = list(seg.get_segment_numbers())
    if len(numbers) > 1:
        wanted = []
        for number in numbers:
            description = seg.get_segment_description(number)
            words = f"{description.segment_label} {description.segmented_property_type.meaning}".lower()
            if "pneumothorax" in words:
                wanted.append(number)
        if not wanted:
            labels = ", ".join(f"{n}: {seg.get_segment_description(n).segment_label}" for n in numbers)
            raise DatasetError(f"{path}: {len(numbers)} segments and none is a pneumothorax ({labels}); label one so")
        numbers = wanted
    uids = [str(header.SOPInstanceUID) for header in headers]
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids,
            segment_numbers=numbers,
            combine_segments=True,
            assert_missing_frames_are_empty=True,
            skip_overlap_checks=True,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise DatasetError(f"{path}: the SEG does not fit the case's series: {exc}") from None
    return np.asarray(pixels) > 0


def nifti_on_series_grid(path: Path, geometry: SeriesGeometry) -> np.ndarray:
    """A NIfTI label map as (slices, rows, columns) bool on the series' grid; raises DatasetError
    when it lies on another grid."""
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several kinds for a file it cannot read
        raise DatasetError(f"{path}: not a readable NIfTI file: {exc}") from None
    target = affine_from_geometry(geometry)
    if len(image.shape) != 3:
        raise DatasetError(f"{path}: a 3D label map is needed, the file has shape {image.shape}")
    reoriented = image.as_reoriented(ornt_transform(io_orientation(image.affine), io_orientation(target)))
    expected = (geometry.columns, geometry.rows, len(geometry.order))
    spacing = min(geometry.pixel_spacing_mm + (geometry.slice_spacing_mm,))
    if reoriented.shape != expected or not np.allclose(reoriented.affine, target, atol=0.01 * spacing):
        raise DatasetError(
            f"{path}: the mask's grid (shape {reoriented.shape}) is not the series' grid (shape {expected}); "
            "resample the mask to the series (e.g. export it from 3D Slicer with the CT as reference)"
        )
    data = np.asarray(reoriented.dataobj)
    return np.transpose(data, (2, 1, 0)) > 0


def load_case(case: CTCase) -> LoadedCase:
    """Read a case's slices (ordered by position, in HU) and its truth on the same grid."""
    datasets = []
    for path in case.series_files:
        try:
            ds = pydicom.dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            raise DatasetError(f"{path}: not a readable DICOM file: {exc}") from None
        problem = ct_slice_problem(ds)
        if problem:
            raise DatasetError(f"{path}: {problem}")
        datasets.append(ds)
    try:
        geometry = series_geometry(datasets)
        ordered = [datasets[i] for i in geometry.order]
        hu = np.stack([slice_hu(ds) for ds in ordered])
    except (SeriesError, ImageDecodeError) as exc:
        raise DatasetError(f"case {case.case_id}: {exc}") from None
    for ds in ordered:
        del ds.PixelData  # the headers are kept; the pixels are in ``hu``
    if case.mask_format == "seg":
        mask = _seg_mask(case.mask_path, ordered)
    else:
        mask = nifti_on_series_grid(case.mask_path, geometry)
    if mask.shape != hu.shape:
        raise DatasetError(f"{case.mask_path}: mask shape {mask.shape} does not match the series {hu.shape}")
    return LoadedCase(hu=hu, mask=mask, geometry=geometry, headers=ordered)
