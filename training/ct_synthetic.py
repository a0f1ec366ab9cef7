"""A synthetic chest CT phantom with a pneumothorax of analytically known volume.

The phantom lives in patient coordinates (DICOM LPS, millimetres, the origin in the middle of the
chest): an elliptic cylinder of soft tissue (the chest wall and mediastinum, +40 HU) in air
(-1000 HU), two ellipsoidal lungs (-850 HU), and in one lung a pneumothorax: the anterior cap of
that lung's ellipsoid, cut off by a coronal plane, filled with air (-1000 HU) instead of lung. An
ellipsoid cap has a closed-form volume, so the tests compare the measured volume with the truth,
not with another measurement.

The patient's right is -x (LPS), so a right pneumothorax lies at low column numbers in the usual
axial display. The slices are written head first (the first instance is the most superior), so a
reader that trusts Instance Number instead of Image Position gets the order wrong.

:func:`write_ct_series` writes the slices as CT Image Storage instances (Image Position/Orientation
Patient, Pixel Spacing, Slice Thickness, Rescale Slope/Intercept, Frame of Reference);
:func:`write_seg_mask` writes the truth as a DICOM SEG (what 3D Slicer exports),
:func:`write_nifti_mask` as NIfTI, and :func:`write_ct_dataset` lays out a training set of cases.

None of this resembles a patient; it exists so the software can be trained, tested and
demonstrated end to end without patient data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from contract.ct_preprocess import SeriesGeometry, series_geometry
from training.synthetic import SYNTHETIC_PATIENT_NAME, UID_PREFIX, set_monochrome_pixels, synthetic_header

__all__ = [
    "CT_SERIES_DIR",
    "Phantom",
    "affine_from_geometry",
    "ct_affine",
    "ct_slice_dataset",
    "make_phantom",
    "write_ct_dataset",
    "write_ct_series",
    "write_nifti_mask",
    "write_seg_mask",
]

AIR_HU, LUNG_HU, TISSUE_HU = -1000.0, -850.0, 40.0
RESCALE_INTERCEPT = -1024.0
BITS_STORED = 12
CT_SERIES_DIR = "series"
SEG_MASK_NAME = "segmentation.dcm"
NIFTI_MASK_NAME = "segmentation.nii.gz"
SYNTHETIC_CT_DESCRIPTION = "SYNTHETIC chest CT phantom (generated, not a patient)"


@dataclass(frozen=True)
class Phantom:
    """One phantom volume on its voxel grid, indexed (slice, row, column), slice 0 the most inferior."""

    hu: np.ndarray
    """Hounsfield units, float32 (slices, rows, columns)."""
    pneumothorax: np.ndarray
    """The truth, bool (slices, rows, columns)."""
    pixel_spacing_mm: float
    """In-plane spacing (rows and columns alike)."""
    slice_spacing_mm: float
    """Distance between slice centres (= the slice thickness: contiguous slices)."""
    origin_mm: tuple[float, float, float]
    """Image Position (Patient) of slice 0's first voxel, LPS."""
    side: Literal["right", "left"] | None
    """The patient's side of the pneumothorax; None for a phantom without one."""
    analytic_volume_ml: float
    """The pneumothorax's volume from the ellipsoid-cap formula (0 without one)."""
    seed: int

    @property
    def voxel_volume_ml(self) -> float:
        return self.pixel_spacing_mm**2 * self.slice_spacing_mm / 1000.0

    @property
    def mask_volume_ml(self) -> float:
        """The rasterised truth's volume (voxel count x voxel volume)."""
        return float(self.pneumothorax.sum()) * self.voxel_volume_ml


def _ellipsoid_cap_ml(a: float, b: float, c: float, depth: float) -> float:
    """Volume (mL) of the part of the ellipsoid x²/a² + y²/b² + z²/c² <= 1 with y <= -b + depth.

    Integrating the ellipse sections pi * a * c * (1 - y²/b²) over y from -b to -b + h gives
    pi * a * c * h² * (3b - h) / (3 b²).
    """
    h = min(max(depth, 0.0), 2 * b)
    return math.pi * a * c * h * h * (3 * b - h) / (3 * b * b) / 1000.0


def make_phantom(
    seed: int,
    *,
    slices: int = 40,
    size: int = 128,
    field_of_view_mm: float = 360.0,
    length_mm: float = 300.0,
    pneumothorax: bool = True,
    side: Literal["right", "left"] | None = None,
    noise_hu: float = 20.0,
) -> Phantom:
    """A phantom of ``slices`` axial slices of ``size`` x ``size`` pixels covering ``length_mm``.

    The anatomy's proportions, the side and the depth of the pneumothorax (a quarter to a half of
    the lung's antero-posterior depth) follow from the seed.
    """
    if slices < 4 or size < 32:
        raise ValueError(f"make_phantom: at least 4 slices of 32 px (got {slices} of {size})")
    rng = np.random.default_rng([seed, 71])
    spacing = field_of_view_mm / size
    dz = length_mm / slices
    origin = (-field_of_view_mm / 2 + spacing / 2, -field_of_view_mm / 2 + spacing / 2, -length_mm / 2 + dz / 2)
    x = origin[0] + spacing * np.arange(size, dtype=np.float64)
    y = origin[1] + spacing * np.arange(size, dtype=np.float64)
    z = origin[2] + dz * np.arange(slices, dtype=np.float64)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")

    fov = field_of_view_mm
    body_a, body_b = fov * rng.uniform(0.40, 0.44), fov * rng.uniform(0.28, 0.31)
    hu = np.full(zz.shape, AIR_HU, dtype=np.float32)
    hu[(xx / body_a) ** 2 + (yy / body_b) ** 2 <= 1.0] = TISSUE_HU

    lung_a, lung_b, lung_c = fov * rng.uniform(0.13, 0.15), fov * rng.uniform(0.19, 0.21), length_mm * 0.42
    centre_x = fov * rng.uniform(0.18, 0.20)
    chosen = side or ("right" if rng.random() < 0.5 else "left")
    depth = lung_b * rng.uniform(0.5, 0.9)  # the cap's depth: a quarter to under half the lung's depth
    truth = np.zeros(zz.shape, dtype=bool)
    for lung_side, cx in (("right", -centre_x), ("left", centre_x)):
        inside = ((xx - cx) / lung_a) ** 2 + (yy / lung_b) ** 2 + (zz / lung_c) ** 2 <= 1.0
        hu[inside] = LUNG_HU
        if pneumothorax and lung_side == chosen:
            truth = inside & (yy <= -lung_b + depth)  # anterior is -y in LPS
    hu[truth] = AIR_HU
    hu += rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    np.rint(hu, out=hu)
    np.clip(hu, RESCALE_INTERCEPT, RESCALE_INTERCEPT + (1 << BITS_STORED) - 1, out=hu)  # what the slices can store
    volume = _ellipsoid_cap_ml(lung_a, lung_b, lung_c, depth) if pneumothorax else 0.0
    return Phantom(
        hu=hu,
        pneumothorax=truth,
        pixel_spacing_mm=spacing,
        slice_spacing_mm=dz,
        origin_mm=origin,
        side=chosen if pneumothorax else None,
        analytic_volume_ml=volume,
        seed=seed,
    )


def _uid(*parts: object) -> str:
    return generate_uid(UID_PREFIX, entropy_srcs=["pleura-synthetic-ct", *map(str, parts)])


def ct_slice_dataset(
    hu: np.ndarray,
    *,
    position_mm: Sequence[float],
    pixel_spacing_mm: float,
    slice_thickness_mm: float,
    instance_number: int,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    patient_id: str,
    patient_name: str = SYNTHETIC_PATIENT_NAME,
    series_description: str = SYNTHETIC_CT_DESCRIPTION,
) -> Dataset:
    """One axial CT Image Storage slice around ``hu`` (Hounsfield units, (Rows, Columns)).

    The one place that writes a CT slice's header. Stored values are HU + 1024 in 12 bits
    (Rescale Intercept -1024, Slope 1), MONOCHROME2, a lung window; orientation axial (1,0,0,0,1,0).
    """
    stored = np.clip(np.rint(np.asarray(hu, dtype=np.float64) - RESCALE_INTERCEPT), 0, (1 << BITS_STORED) - 1)
    ds = synthetic_header(
        CTImageStorage,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        modality="CT",
        patient_name=patient_name,
        patient_id=patient_id,
        accession_number=f"SYNCT{patient_id[-10:]}",
        study_description="SYNTHETIC chest CT",
        series_number=2,
        series_description=series_description,
        manufacturer="Pleura synthetic CT phantom",
        manufacturer_model_name="training.ct_synthetic",
        instance_number=instance_number,
    )
    ds.ImageType = ["DERIVED", "PRIMARY", "AXIAL"]
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.ImageComments = "Synthetic CT phantom made by Pleura's generator; not a patient."
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [f"{pixel_spacing_mm:.6g}", f"{pixel_spacing_mm:.6g}"]
    ds.SliceThickness = f"{slice_thickness_mm:.6g}"
    ds.SliceLocation = f"{position_mm[2]:.4f}"
    ds.KVP = 120
    set_monochrome_pixels(ds, stored, BITS_STORED)
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


def phantom_datasets(phantom: Phantom, *, case_id: str | None = None) -> list[Dataset]:
    """The phantom's slices as CT datasets, most superior first (Instance Number 1)."""
    key = case_id or f"SYNCT-{phantom.seed}"
    study, series, frame = (_uid(key, part) for part in ("study", "series", "frame"))
    count = phantom.hu.shape[0]
    datasets = []
    for number, index in enumerate(range(count - 1, -1, -1), start=1):
        position = (phantom.origin_mm[0], phantom.origin_mm[1], phantom.origin_mm[2] + index * phantom.slice_spacing_mm)
        datasets.append(
            ct_slice_dataset(
                phantom.hu[index],
                position_mm=position,
                pixel_spacing_mm=phantom.pixel_spacing_mm,
                slice_thickness_mm=phantom.slice_spacing_mm,
                instance_number=number,
                sop_instance_uid=_uid(key, "slice", index),
                study_instance_uid=study,
                series_instance_uid=series,
                frame_of_reference_uid=frame,
                patient_id=key,
            )
        )
    return datasets


def write_ct_series(phantom: Phantom, folder: Path | str, *, case_id: str | None = None) -> list[Path]:
    """Write the phantom's slices into ``folder`` (one Part 10 file per slice); returns the paths,
    in Instance Number order (most superior first)."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in phantom_datasets(phantom, case_id=case_id):
        path = target / f"{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _by_position(datasets: Sequence[Dataset]) -> list[Dataset]:
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def write_seg_mask(phantom: Phantom, datasets: Sequence[Dataset], path: Path | str) -> Path:
    """The truth as a binary DICOM SEG on the series ``datasets`` (the form 3D Slicer exports):
    one segment "Pneumothorax", manual, frames for the slices the mask touches."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = _by_position(datasets)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Pneumothorax",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Pneumothorax,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=phantom.pneumothorax,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=_uid(sources[0].SeriesInstanceUID, "truth-series"),
        series_number=300,
        sop_instance_uid=_uid(sources[0].SeriesInstanceUID, "truth"),
        instance_number=1,
        manufacturer="Pleura synthetic CT phantom",
        manufacturer_model_name="training.ct_synthetic",
        software_versions="1",
        device_serial_number="0",
        series_description="SYNTHETIC truth segmentation",
        omit_empty_frames=True,
    )
    target = Path(path)
    seg.save_as(target)
    return target


def affine_from_geometry(geometry: SeriesGeometry) -> np.ndarray:
    """The NIfTI (RAS) affine of a series' voxel grid indexed (column, row, slice), slices ordered by
    position: the convention of dcm2niix and 3D Slicer's NIfTI export."""
    lps = np.eye(4)
    lps[:3, 0] = geometry.row_direction * geometry.pixel_spacing_mm[1]
    lps[:3, 1] = geometry.column_direction * geometry.pixel_spacing_mm[0]
    lps[:3, 2] = geometry.normal * geometry.slice_spacing_mm
    lps[:3, 3] = geometry.origin_mm
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS


def ct_affine(datasets: Sequence[Dataset]) -> np.ndarray:
    """:func:`affine_from_geometry` of the series ``datasets``."""
    return affine_from_geometry(series_geometry(datasets))


def write_nifti_mask(phantom: Phantom, datasets: Sequence[Dataset], path: Path | str) -> Path:
    """The truth as a NIfTI label map (uint8, 1 = pneumothorax) on the series' grid."""
    import nibabel as nib

    data = np.transpose(phantom.pneumothorax.astype(np.uint8), (2, 1, 0))  # (column, row, slice)
    image = nib.Nifti1Image(data, ct_affine(datasets))
    target = Path(path)
    nib.save(image, target)
    return target


def write_ct_dataset(
    root: Path | str,
    cases: int,
    *,
    slices: int = 24,
    size: int = 64,
    mask_format: Literal["seg", "nifti"] = "seg",
    seed: int = 0,
    on_case: Callable[[int], None] | None = None,
) -> Path:
    """A training set of ``cases`` phantoms: ``root/<case>/series/*.dcm`` and the truth as
    ``root/<case>/segmentation.dcm`` (SEG) or ``segmentation.nii.gz`` (NIfTI). Every case has a
    pneumothorax; its slices above and below it are the negatives."""
    if mask_format not in ("seg", "nifti"):
        raise ValueError(f"mask_format must be seg or nifti, not {mask_format!r}")
    root = Path(root)
    for number in range(cases):
        case_id = f"SYNCT-{seed}-{number:03d}"
        phantom = make_phantom(seed * 10_007 + number, slices=slices, size=size)
        folder = root / case_id
        write_ct_series(phantom, folder / CT_SERIES_DIR, case_id=case_id)
        datasets = [pydicom.dcmread(path) for path in sorted((folder / CT_SERIES_DIR).glob("*.dcm"))]
        if mask_format == "seg":
            write_seg_mask(phantom, datasets, folder / SEG_MASK_NAME)
        else:
            write_nifti_mask(phantom, datasets, folder / NIFTI_MASK_NAME)
        if on_case is not None:
            on_case(number + 1)
    return root
