"""Synthetic chest radiographs with synthetic pneumothoraces, for tests and the demo model.

Every image is a deterministic function of its seed. The anatomy is drawn in "density" units (bright
= dense, the MONOCHROME2 sense): a body outline whose brightness follows its thickness, two lung
fields (dark), the heart, mediastinum and spine (bright), clavicles and ribs as curved bright bands,
and vessel-like lung markings branching out from each hilum, then blurred and given noise.

A pneumothorax is air between the chest wall and a partly collapsed lung: the lung's outline is
shrunk from its lateral and apical side, and the gap (the mask) is darker, has no lung markings,
and is bordered by a thin bright visceral pleural line. The same seed gives the same anatomy with
or without the pneumothorax.

None of this resembles a patient closely enough to teach a model anything clinical; it exists so
the software can be trained, tested and demonstrated end to end without patient data.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from training.rle import rle_encode

__all__ = [
    "SIIM_CSV_HEADER",
    "SIIM_CSV_NAME",
    "SIIM_IMAGE_DIR",
    "SYNTHETIC_PATIENT_NAME",
    "synthetic_chest_image",
    "radiograph_dataset",
    "synthetic_dicom",
    "to_jpeg_baseline",
    "write_siim_dataset",
]

BITS_STORED = 12
DETECTOR_WIDTH_MM = 430.0  # a 43 cm flat panel, so the spacing (and areas in cm2) look like a chest
SYNTHETIC_PATIENT_NAME = "SYNTHETIC^DEMO"
SYNTHETIC_SERIES_DESCRIPTION = "SYNTHETIC chest radiograph (generated image, not a patient)"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root; deterministic suffixes from the seed

SIIM_IMAGE_DIR = "dicom-images-train"
SIIM_CSV_NAME = "train-rle.csv"
SIIM_CSV_HEADER = ["ImageId", " EncodedPixels"]


@dataclass(frozen=True)
class _Lung:
    """One lung field in pixel units; ``side`` -1 is the image's left (the patient's right on a PA)."""

    side: int
    medial_x: float  # x of the medial (mediastinal) border
    width: float  # lateral extent from the medial border
    top: float  # y of the apex
    bottom: float  # y of the lateral costophrenic angle
    dome: float  # how far the diaphragm rises at the lung's middle

    def mask(self, xx: np.ndarray, yy: np.ndarray, *, width: float | None = None, top: float | None = None,
             wobble: np.ndarray | float = 0.0) -> np.ndarray:
        """Inside the lung; ``width``/``top`` give a lung collapsed from its lateral and apical side."""
        width = self.width if width is None else width
        top = self.top if top is None else top
        lateral = self.side * (xx - self.medial_x)  # distance from the medial border, lateral positive
        t = np.clip((yy - top) / (self.bottom - top), 0.0, None)
        centre = 0.45 * width
        half = 0.52 * width * np.sqrt(np.minimum(t, 1.0)) * (1.0 + 0.08 * np.minimum(t, 1.0)) + wobble
        from_dome_centre = (lateral - 0.5 * self.width) / (0.65 * self.width)
        diaphragm = self.bottom - self.dome * np.clip(1.0 - from_dome_centre**2, 0, 1)
        return (yy >= top) & (np.abs(lateral - centre) <= half) & (lateral >= 0) & (yy <= diaphragm)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders."""
    if sigma <= 0:
        return image.astype(np.float32, copy=True)
    radius = max(1, int(round(3 * sigma)))
    radius = min(radius, min(image.shape) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    tensor = F.pad(tensor, (radius, radius, radius, radius), mode="reflect")
    tensor = F.conv2d(tensor, kernel.view(1, 1, 1, -1))
    tensor = F.conv2d(tensor, kernel.view(1, 1, -1, 1))
    return tensor[0, 0].numpy()


def _draw_segment(canvas: np.ndarray, p0: np.ndarray, p1: np.ndarray, width: float, amplitude: float) -> None:
    """Max-blend a soft line (Gaussian profile, ``width`` px) from p0 to p1 (x, y) into ``canvas``."""
    reach = 2.5 * width + 1
    x0 = int(max(0, np.floor(min(p0[0], p1[0]) - reach)))
    x1 = int(min(canvas.shape[1], np.ceil(max(p0[0], p1[0]) + reach) + 1))
    y0 = int(max(0, np.floor(min(p0[1], p1[1]) - reach)))
    y1 = int(min(canvas.shape[0], np.ceil(max(p0[1], p1[1]) + reach) + 1))
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    direction = p1 - p0
    length_sq = float(direction @ direction) or 1e-6
    t = np.clip(((xx - p0[0]) * direction[0] + (yy - p0[1]) * direction[1]) / length_sq, 0.0, 1.0)
    distance_sq = (xx - p0[0] - t * direction[0]) ** 2 + (yy - p0[1] - t * direction[1]) ** 2
    stroke = amplitude * np.exp(-distance_sq / (width * width))
    np.maximum(canvas[y0:y1, x0:x1], stroke, out=canvas[y0:y1, x0:x1])


def _draw_vessel_tree(canvas: np.ndarray, rng: np.random.Generator, lung: _Lung, lung_mask: np.ndarray,
                      hilum: np.ndarray, scale: float) -> None:
    """Branching vessel markings from the hilum toward the lung's periphery."""
    rows, columns = lung_mask.shape
    # (position, angle, width, amplitude, generation)
    stack: list[tuple[np.ndarray, float, float, float, int]] = []
    for _ in range(int(rng.integers(14, 20))):
        # Mostly lateral, fanning up and down; angle 0 points laterally.
        angle = float(rng.uniform(-1.35, 1.35))
        stack.append((hilum.copy(), angle, float(rng.uniform(3.0, 4.5)) * scale, float(rng.uniform(0.06, 0.09)), 0))
    step = 10.0 * scale
    while stack:
        position, angle, width, amplitude, generation = stack.pop()
        entered = False
        for steps in range(60):
            angle += float(rng.normal(0.0, 0.15))
            direction = np.array([lung.side * np.cos(angle), np.sin(angle)], dtype=np.float32)
            following = position + step * direction
            x, y = int(following[0]), int(following[1])
            inside = 0 <= x < columns and 0 <= y < rows and bool(lung_mask[y, x])
            if (entered and not inside) or (not entered and steps >= 8):
                break  # left the lung, or started in the mediastinum and never reached it
            entered = entered or inside
            if inside:
                _draw_segment(canvas, position, following, max(width, 0.6 * scale), amplitude)
            position = following
            width *= 0.94
            amplitude *= 0.95
            if generation < 2 and rng.random() < 0.15:
                branch_angle = angle + float(rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.8))
                stack.append((position.copy(), branch_angle, width * 0.75, amplitude * 0.85, generation + 1))


def synthetic_chest_image(seed: int, positive: bool, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic PA chest radiograph: (image uint16 (size, size), 12 bits used; mask bool (size, size)).

    ``positive`` adds a pneumothorax on a random side; the mask is the pneumothorax (all False when
    negative). The same ``seed`` gives the same anatomy and noise either way.
    """
    if size < 64:
        raise ValueError(f"synthetic image size must be at least 64 pixels, got {size}")
    anatomy = np.random.default_rng([seed, 0])
    lesion = np.random.default_rng([seed, 1])
    scale = size / 512.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = xx / size, yy / size

    # Body: brightness follows the thickness of an elliptical trunk, narrowing to the neck at the top.
    centre_x = 0.5 + anatomy.uniform(-0.02, 0.02)
    body_half = anatomy.uniform(0.42, 0.47) * np.clip(0.55 + 2.2 * v, 0.0, 1.0) ** 0.5
    across = np.clip(1.0 - ((u - centre_x) / body_half) ** 2, 0.0, 1.0)
    density = 0.04 + 0.5 * np.sqrt(across)

    # Lungs.
    medial = anatomy.uniform(0.055, 0.075) * size
    lung_width = anatomy.uniform(0.27, 0.32) * size
    top = anatomy.uniform(0.11, 0.16) * size
    bottom = anatomy.uniform(0.70, 0.78) * size
    centre_px = centre_x * size
    lungs = [
        _Lung(side, centre_px + side * medial * (1.15 if side > 0 else 1.0), lung_width * (0.94 if side > 0 else 1.0),
              top + (0.01 * size if side > 0 else 0.0), bottom + (0.015 * size if side > 0 else 0.0),
              anatomy.uniform(0.07, 0.11) * size)
        for side in (-1, 1)
    ]
    heart = (((u - (centre_x + anatomy.uniform(0.05, 0.08))) / anatomy.uniform(0.14, 0.17)) ** 2
             + ((v - anatomy.uniform(0.60, 0.64)) / anatomy.uniform(0.11, 0.13)) ** 2) <= 1.0
    lung_masks = [lung.mask(xx, yy) & ~heart for lung in lungs]

    # Pneumothorax: the lung collapses from its lateral and apical border.
    ptx_mask = np.zeros((size, size), dtype=bool)
    keep_markings = [np.ones((size, size), dtype=bool), np.ones((size, size), dtype=bool)]
    pleural_line = np.zeros((size, size), dtype=np.float32)
    if positive:
        index = int(lesion.integers(0, 2))
        lung = lungs[index]
        lateral_gap = lesion.uniform(0.18, 0.42)
        apical_gap = lesion.uniform(0.08, 0.3)
        phase, frequency = lesion.uniform(0, 2 * np.pi), lesion.uniform(3, 7)
        wobble = 0.025 * lung.width * np.sin(frequency * 2 * np.pi * yy / size + phase)
        collapsed = lung.mask(xx, yy, width=lung.width * (1 - lateral_gap),
                              top=lung.top + apical_gap * (lung.bottom - lung.top), wobble=wobble)
        collapsed &= lung_masks[index]
        ptx_mask = lung_masks[index] & ~collapsed
        keep_markings[index] = collapsed
        # The visceral pleura: the collapsed lung's outline where it faces the air.
        thickness = max(1, int(round(1.5 * scale)))
        eroded = collapsed.copy()
        for _ in range(thickness):
            eroded &= np.roll(eroded, 1, 0) & np.roll(eroded, -1, 0) & np.roll(eroded, 1, 1) & np.roll(eroded, -1, 1)
        grown = ptx_mask.copy()
        for _ in range(thickness + 1):
            grown |= np.roll(grown, 1, 0) | np.roll(grown, -1, 0) | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
        pleural_line = (collapsed & ~eroded & grown).astype(np.float32)

    lung_soft = _gaussian_blur((lung_masks[0] | lung_masks[1]).astype(np.float32), 2.5 * scale)
    density -= 0.3 * lung_soft * np.sqrt(across)

    # Mediastinum, heart, spine.
    mediastinum = (np.abs(u - centre_x) < 0.075) & (v > 0.08) & (v < 0.9)
    density += _gaussian_blur(0.1 * mediastinum + 0.06 * heart.astype(np.float32), 5 * scale)
    spine = np.abs(u - centre_x) < anatomy.uniform(0.03, 0.04)
    vertebrae = 0.75 + 0.25 * (np.sin(2 * np.pi * v / anatomy.uniform(0.045, 0.055)) > -0.7)
    density += 0.12 * _gaussian_blur((spine * vertebrae).astype(np.float32), 1.5 * scale)

    # Ribs and clavicles: curved bands with brighter cortical edges, inside the body.
    bones = np.zeros((size, size), dtype=np.float32)
    from_midline = np.abs(u - centre_x)
    spacing = anatomy.uniform(0.058, 0.068)
    first_rib = anatomy.uniform(0.1, 0.13)
    for rib in range(10):
        centre_line = first_rib + rib * spacing + anatomy.uniform(1.1, 1.4) * (from_midline - 0.17) ** 2 - 0.035
        half_thickness = 0.011 + 0.003 * rib / 9
        offset = np.abs(v - centre_line) / half_thickness
        band = np.clip(1 - offset, 0, 1) ** 0.5 * (0.6 + 0.4 * np.exp(-((offset - 0.85) ** 2) / 0.02))
        bones = np.maximum(bones, 0.085 * band * ((from_midline > 0.035) & (from_midline < 0.44)))
    for side in (-1, 1):
        clavicle_line = 0.13 - 0.1 * (from_midline - 0.05) + anatomy.uniform(-0.01, 0.01)
        reach = (side * (u - centre_x) > 0.03) & (from_midline < 0.3)
        band = np.clip(1 - np.abs(v - clavicle_line) / 0.012, 0, 1) ** 0.5
        bones = np.maximum(bones, 0.11 * band * reach)
    density += bones * (across > 0)

    # Lung markings.
    vessels = np.zeros((size, size), dtype=np.float32)
    for lung, mask, keep in zip(lungs, lung_masks, keep_markings):
        hilum = np.array(
            [lung.medial_x + lung.side * 0.12 * lung.width, lung.top + 0.5 * (lung.bottom - lung.top)], dtype=np.float32
        )
        tree = np.zeros((size, size), dtype=np.float32)
        _draw_vessel_tree(tree, anatomy, lung, mask, hilum, scale)
        vessels += tree * mask * keep
    density += vessels

    # The pneumothorax: air without lung tissue, and the pleural line.
    if positive:
        density += _gaussian_blur(0.07 * pleural_line - 0.05 * ptx_mask, 0.8 * scale)

    # Acquisition: unsharpness, uneven exposure, quantum noise.
    density = _gaussian_blur(density, 0.8 * scale)
    coarse = torch.from_numpy(anatomy.normal(0.0, 1.0, (1, 1, 6, 6)).astype(np.float32))
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    field *= 0.03 / (float(np.abs(field).max()) or 1.0)
    density = density * anatomy.uniform(0.9, 1.08) + field + anatomy.uniform(-0.03, 0.03)
    density += anatomy.normal(0.0, anatomy.uniform(0.008, 0.016), (size, size)).astype(np.float32)
    top_value = (1 << BITS_STORED) - 1
    image = np.clip(np.rint(np.clip(density, 0.0, 1.0) * top_value), 0, top_value).astype(np.uint16)
    return image, ptx_mask


def _uid(*parts: object) -> str:
    return generate_uid(UID_PREFIX, entropy_srcs=["pleura-synthetic", *map(str, parts)])


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def synthetic_header(
    sop_class: str,
    *,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    modality: str,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str = "",
    study_id: str = "1",
    accession_number: str = "",
    study_description: str,
    series_number: int,
    series_description: str,
    manufacturer: str,
    manufacturer_model_name: str,
    instance_number: int,
) -> Dataset:
    """What every synthetic image's header holds alike, radiograph or CT slice: the file meta,
    the SOP Common, Patient, General Study, General Series and General Equipment modules, the
    instance number and content date; the image's own modules are the caller's."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "PLEURA_SYNTH"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = study_id[-16:]
    ds.AccessionNumber = accession_number[-16:]
    ds.StudyDescription = study_description
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = manufacturer_model_name
    # General Image
    ds.InstanceNumber = instance_number
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.BurnedInAnnotation = "NO"
    return ds


def set_monochrome_pixels(ds: Dataset, stored: np.ndarray, bits_stored: int) -> None:
    """The Image Pixel module of a MONOCHROME2 image of unsigned ``stored`` values (Rows, Columns)
    in ``bits_stored`` bits of 16, and its pixel data."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16, copy=False)).tobytes()


def radiograph_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    bits_stored: int = BITS_STORED,
    sop_instance_uid: str,
    study_instance_uid: str,
    series_instance_uid: str,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str = "",
    accession_number: str = "",
    study_id: str = "1",
    study_description: str = "CHEST PA",
    series_description: str = "Chest PA",
    manufacturer: str = "Pleura",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY"),
    image_comments: str | None = None,
    imager_pixel_spacing: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
) -> Dataset:
    """A single-frame MONOCHROME2 chest PA radiograph (DX For Presentation or CR) around ``pixels``.

    The one place that writes a radiograph's header, for the synthetic data sets and the tests.
    ``pixels`` is uint16 (Rows, Columns) using ``bits_stored`` bits. ``window`` is (center, width),
    by default the full range. A DX needs ``imager_pixel_spacing`` to be valid (Type 1); leaving it
    out makes an image without spacing, as some modalities send.
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    array = np.asarray(pixels)
    if array.ndim != 2 or array.dtype != np.uint16:
        raise ValueError(f"radiograph_dataset: pixels must be uint16 (Rows, Columns), got {array.dtype} {array.shape}")
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage

    ds = synthetic_header(
        sop_class,
        sop_instance_uid=sop_instance_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        modality=modality,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=patient_birth_date,
        study_id=study_id,
        accession_number=accession_number,
        study_description=study_description,
        series_number=1,
        series_description=series_description,
        manufacturer=manufacturer,
        manufacturer_model_name="training.synthetic",
        instance_number=1,
    )
    ds.InstanceCreationDate = "20240101"
    ds.InstanceCreationTime = "120000"
    # DX / CR Series, General Image, General Acquisition
    ds.ViewPosition = "PA"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = list(image_type)
    if image_comments:
        ds.ImageComments = image_comments
    ds.LossyImageCompression = "00"
    if modality == "DX":
        # DX Anatomy Imaged, DX Positioning, DX Detector, Acquisition Context, DX Image
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = [_code("51185008", "SCT", "Thorax")]
        ds.ViewCodeSequence = [_code("399348003", "SCT", "postero-anterior")]
        ds.PositionerType = ""
        ds.DetectorType = "DIRECT"
        ds.AcquisitionContextSequence = []
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:.6g}" for v in imager_pixel_spacing]
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in pixel_spacing]
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "test calibration"
    # Image Pixel, VOI LUT
    set_monochrome_pixels(ds, array, bits_stored)
    center, width = window if window is not None else (1 << (bits_stored - 1), 1 << bits_stored)
    ds.WindowCenter = center
    ds.WindowWidth = width
    return ds


def synthetic_dicom(
    seed: int, positive: bool, size: int = 512, *, patient_id: str | None = None
) -> tuple[pydicom.Dataset, np.ndarray]:
    """A synthetic DX For Presentation chest PA (MONOCHROME2, 12 bits in 16) and its pneumothorax mask.

    UIDs, patient and dates follow from the seed, so the same call gives the same instance
    (``patient_id`` puts several images under one synthetic patient). PatientName is SYNTHETIC^DEMO
    and the series description says the image is synthetic.
    """
    pixels, mask = synthetic_chest_image(seed, positive, size)
    label = "positive" if positive else "negative"
    spacing = DETECTOR_WIDTH_MM / size
    ds = radiograph_dataset(
        pixels,
        sop_instance_uid=_uid(seed, label, size, "instance"),
        study_instance_uid=_uid(seed, label, size, "study"),
        series_instance_uid=_uid(seed, label, size, "series"),
        patient_name=SYNTHETIC_PATIENT_NAME,
        patient_id=patient_id or f"SYN-{seed}",
        accession_number=f"SYN{seed}",
        study_id=str(seed),
        study_description="SYNTHETIC chest PA",
        series_description=SYNTHETIC_SERIES_DESCRIPTION,
        manufacturer="Pleura synthetic image generator",
        image_type=("DERIVED", "PRIMARY"),
        image_comments="Synthetic image made by Pleura's generator; not a patient. "
        + ("Contains a synthetic pneumothorax." if positive else "No synthetic pneumothorax."),
        imager_pixel_spacing=(spacing, spacing),
    )
    return ds, mask


def to_jpeg_baseline(ds: Dataset, quality: int = 95) -> Dataset:
    """``ds`` re-encoded as the SIIM-ACR files are: 8-bit MONOCHROME2, JPEG Baseline (lossy), in place.

    The stored values are scaled to 8 bits by the image's bit depth; the window follows.
    """
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    pixels = ds.pixel_array.astype(np.uint32)
    eight = (pixels >> max(int(ds.BitsStored) - 8, 0)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(eight, mode="L").save(buffer, format="JPEG", quality=quality)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def _mask_parts(mask: np.ndarray) -> list[np.ndarray]:
    """A mask as its upper and lower part (one part when it spans a single row or is empty)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) < 2:
        return [mask]
    cut = int(rows[len(rows) // 2])
    upper, lower = mask.copy(), mask.copy()
    upper[cut:] = False
    lower[:cut] = False
    return [upper, lower]


def write_siim_dataset(
    out_dir: Path,
    n: int,
    size: int = 512,
    positive_fraction: float = 0.5,
    seed: int = 0,
    on_image: Callable[[int], None] | None = None,
    *,
    images_per_patient: int = 1,
    split_masks: bool = False,
    jpeg: bool = False,
) -> Path:
    """Write ``n`` synthetic images in the SIIM-ACR Pneumothorax layout and return ``out_dir``.

    ``<out_dir>/dicom-images-train/<study>/<series>/<sop>.dcm`` and ``<out_dir>/train-rle.csv``
    (header "ImageId, EncodedPixels", one row per image, "-1" for an image without pneumothorax).
    Exactly ``round(n * positive_fraction)`` images are positive, in an order fixed by ``seed``.
    ``on_image(count)`` is called after each image is written (for progress bars).

    ``images_per_patient`` > 1 gives consecutive images one synthetic patient (PatientID
    ``SYN-P<k>``), for patient-level splits. ``split_masks`` writes each positive mask as two rows
    (its upper and lower part), as the real set does for an image with several pneumothoraces.
    ``jpeg`` stores the images as the real set does: 8-bit JPEG Baseline (:func:`to_jpeg_baseline`).
    """
    if images_per_patient < 1:
        raise ValueError(f"write_siim_dataset: images_per_patient must be at least 1, got {images_per_patient}")
    if n < 1:
        raise ValueError(f"write_siim_dataset: n must be at least 1, got {n}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"write_siim_dataset: positive_fraction must be within 0..1, got {positive_fraction}")
    root = Path(out_dir)
    images_dir = root / SIIM_IMAGE_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng([seed, 2]).permutation(n)
    positives = set(order[: int(round(n * positive_fraction))].tolist())
    image_seeds = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)
    rows: list[tuple[str, str]] = []
    for index in range(n):
        patient = f"SYN-P{index // images_per_patient}" if images_per_patient > 1 else None
        ds, mask = synthetic_dicom(int(image_seeds[index]), index in positives, size, patient_id=patient)
        target = images_dir / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        if jpeg:
            to_jpeg_baseline(ds)
        ds.save_as(target, enforce_file_format=True)
        for part in _mask_parts(mask) if split_masks else [mask]:
            rows.append((str(ds.SOPInstanceUID), " " + rle_encode(part)))
        if on_image is not None:
            on_image(index + 1)
    with (root / SIIM_CSV_NAME).open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SIIM_CSV_HEADER)
        writer.writerows(rows)
    return root
