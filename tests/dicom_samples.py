"""DICOM inputs and checks shared by the tests.

- :func:`synthetic_radiograph`: a small, valid DX (or CR) chest radiograph made here, with or
  without pixel spacing.
- :func:`pydicom_data_file`: a real radiograph shipped by the ``pydicom-data`` package (imported as
  ``data_store``), e.g. ``RG1_UNCR.dcm`` or ``RG3_UNCR.dcm`` (CR, MONOCHROME1).
- :func:`dciodvfy_errors`: run dicom3tools' ``dciodvfy`` on a file and return its error lines.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

TEST_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root: test data only


def pydicom_data_file(name: str) -> Path:
    """Path of a file shipped by ``pydicom-data``; never downloads anything.

    The distribution is called ``pydicom-data`` but its import package is ``data_store``.
    """
    from data_store import DataStore

    return Path(DataStore().get_path(name))


def _chest_like_pixels(rows: int, columns: int, bits_stored: int, seed: int) -> np.ndarray:
    """A plausible MONOCHROME2 chest pattern: bright mediastinum and ribs, dark lungs, noise."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    y /= rows
    x /= columns
    image = np.full((rows, columns), 0.75, dtype=np.float32)
    for centre_x in (0.3, 0.7):  # the two lungs
        inside = ((x - centre_x) / 0.17) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1
        image[inside] = 0.25
    image += 0.08 * (np.sin(y * 40 * np.pi) > 0.85)  # ribs
    image += np.random.default_rng(seed).normal(0, 0.02, image.shape).astype(np.float32)
    top = (1 << bits_stored) - 1
    return np.clip(image * top, 0, top).astype(np.uint16)


def synthetic_radiograph(
    *,
    rows: int = 512,
    columns: int = 512,
    bits_stored: int = 12,
    modality: str = "DX",
    imager_pixel_spacing: tuple[float, float] | None = (0.4, 0.4),
    pixel_spacing: tuple[float, float] | None = None,
    study_instance_uid: str | None = None,
    patient_name: str = "Synthetic^Chest",
    patient_id: str = "PLEURA-TEST-1",
    seed: int = 0,
) -> Dataset:
    """A single-frame MONOCHROME2 chest radiograph that ``dciodvfy`` accepts (when spacing is given).

    ``modality`` "DX" makes a Digital X-Ray Image Storage - For Presentation instance, "CR" a
    Computed Radiography one. Leaving out ``imager_pixel_spacing`` on a DX makes a (slightly
    invalid, Type 1 missing) image without any spacing, as some modalities send.
    UIDs are random (pydicom root) unless ``study_instance_uid`` is given; pixels depend on ``seed``.
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    sop_class = (
        DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    )
    sop_instance_uid = generate_uid(TEST_UID_PREFIX)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_instance_uid or generate_uid(TEST_UID_PREFIX)
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "CHEST PA"
    # General Series (+ DX / CR Series)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid(TEST_UID_PREFIX)
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Chest PA"
    ds.BodyPartExamined = "CHEST"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    else:
        ds.ViewPosition = "PA"
    # General Equipment
    ds.Manufacturer = "Pleura test suite"
    # General Image / General Acquisition
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    top = (1 << bits_stored) - 1
    ds.WindowCenter = top // 2
    ds.WindowWidth = top
    if modality == "DX":
        # DX Anatomy Imaged, DX Image, DX Detector, DX Positioning, Acquisition Context
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "DIRECT"
        ds.ViewPosition = "PA"
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_pixel_spacing]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "test calibration"
    ds.PixelData = _chest_like_pixels(rows, columns, bits_stored, seed).tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def save_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_output(path: Path | str) -> list[str]:
    """All lines ``dciodvfy`` prints for ``path`` (it reports on stderr; its exit code means little)."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise RuntimeError("dciodvfy not found: install dicom3tools")
    done = subprocess.run(
        [executable, "-new", str(path)], capture_output=True, text=True, errors="replace", timeout=120
    )
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The lines of ``dciodvfy``'s report on ``path`` that are errors (empty = the file is valid)."""
    return [line for line in dciodvfy_output(path) if "Error" in line]


def dciodvfy_warnings(path: Path | str) -> list[str]:
    """The warning lines of ``dciodvfy``'s report on ``path``."""
    return [line for line in dciodvfy_output(path) if line.startswith("Warning")]
