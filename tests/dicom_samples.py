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
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from training.synthetic import radiograph_dataset

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


def lateral_chest_pixels(rows: int = 512, columns: int = 512, bits_stored: int = 12, seed: int = 0) -> np.ndarray:
    """A plausible MONOCHROME2 lateral chest: the two lungs superimposed as one dark field, the
    heart's shadow in front and below, the spine behind, inside a body wider front to back."""
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
    y /= rows
    x /= columns
    image = np.full((rows, columns), 0.05, dtype=np.float32)  # air around the body
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
    image[body] = 0.75
    lungs = ((x - 0.5) / 0.3) ** 2 + ((y - 0.45) / 0.33) ** 2 < 1
    image[lungs] = 0.25
    heart = ((x - 0.38) / 0.14) ** 2 + ((y - 0.66) / 0.14) ** 2 < 1
    image[heart & lungs] = 0.6
    image[(np.abs(x - 0.82) < 0.05) & body] = 0.9  # the spine, behind
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
    The header is written by :func:`training.synthetic.radiograph_dataset`, as for the data sets.
    """
    top = (1 << bits_stored) - 1
    return radiograph_dataset(
        _chest_like_pixels(rows, columns, bits_stored, seed),
        modality=modality,
        bits_stored=bits_stored,
        sop_instance_uid=generate_uid(TEST_UID_PREFIX),
        study_instance_uid=study_instance_uid or generate_uid(TEST_UID_PREFIX),
        series_instance_uid=generate_uid(TEST_UID_PREFIX),
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date="19700101",
        accession_number="ACC0001",
        manufacturer="Pleura test suite",
        imager_pixel_spacing=imager_pixel_spacing,
        pixel_spacing=pixel_spacing,
        window=(top // 2, top),
    )


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


# Objects a PACS holds beside the images of a study, which Pleura accepts but does not analyse.


def comprehensive_sr(image: Dataset, *, manufacturer: str = "Other Vendor", sop_instance_uid: str | None = None) -> Dataset:
    """A small Comprehensive SR (a text report) in `image`'s study, as another vendor writes it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    content = hd.sr.ContainerContentItem(name=codes.DCM.Findings, template_id="2000")
    content.ContentSequence = [
        hd.sr.TextContentItem(
            name=codes.DCM.Finding, value="No pneumothorax.", relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    ]
    return hd.sr.ComprehensiveSR(
        evidence=[image],
        content=content,
        series_instance_uid=generate_uid(TEST_UID_PREFIX),
        series_number=50,
        sop_instance_uid=sop_instance_uid or generate_uid(TEST_UID_PREFIX),
        instance_number=1,
        manufacturer=manufacturer,
    )


def presentation_state(image: Dataset, *, manufacturer: str = "Other Vendor") -> Dataset:
    """A Grayscale Softcopy Presentation State of `image`, as a viewer saves one."""
    import highdicom as hd

    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=generate_uid(TEST_UID_PREFIX),
        series_number=51,
        sop_instance_uid=generate_uid(TEST_UID_PREFIX),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="Viewer",
        software_versions="1",
        device_serial_number="1",
        content_label="VIEWER",
    )


def key_object_selection(image: Dataset) -> Dataset:
    """A Key Object Selection document flagging `image` "For Teaching"."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    selection = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.ForTeaching,
        referenced_objects=[image],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=[image],
        content=selection,
        series_instance_uid=generate_uid(TEST_UID_PREFIX),
        series_number=52,
        sop_instance_uid=generate_uid(TEST_UID_PREFIX),
        instance_number=1,
        manufacturer="Other Vendor",
    )


def encapsulated_pdf(image: Dataset) -> Dataset:
    """An Encapsulated PDF (a scanned request form, say) in `image`'s study."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid(TEST_UID_PREFIX)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime", "AccessionNumber"):
        if keyword in image:
            setattr(ds, keyword, image.data_element(keyword).value)
    ds.SeriesInstanceUID = generate_uid(TEST_UID_PREFIX)
    ds.Modality = "DOC"
    ds.SeriesNumber = 53
    ds.InstanceNumber = 1
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "Request form"
    ds.BurnedInAnnotation = "YES"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
