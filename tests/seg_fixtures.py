"""Segmentations as a PACS viewer writes them when a radiologist outlines (or clears) a finding on
an image Pleura analysed, and helpers to store a synthetic study the way the SCP does."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from highdicom.seg import Segmentation, SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from node.ledger import Ledger
from node.storage import InstanceStore
from worker.writers.common import FINDING_CATEGORY, source_header

VIEWER = "ACME Viewer"


def radiologist_seg(sources: list[pydicom.Dataset], masks: list[np.ndarray], *, label: str = "Pneumothorax",
                    property_type=codes.SCT.Pneumothorax) -> Segmentation:
    """A manual binary SEG of ``masks`` (one per source image, all zeros for "no pneumothorax")."""
    segment = SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=FINDING_CATEGORY,
        segmented_property_type=property_type,
        algorithm_type=SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = Segmentation(
        source_images=[source_header(source, keep_spacing=False) for source in sources],
        pixel_array=np.stack([np.asarray(mask, dtype=bool) for mask in masks]),
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=42,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=VIEWER,
        manufacturer_model_name="Outline",
        software_versions="1.0",
        device_serial_number="SN-1",
        omit_empty_frames=False,
    )
    seg.PatientOrientation = sources[0].get("PatientOrientation") or ""
    return seg


def save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def store_image(ledger: Ledger, store: InstanceStore, ds: pydicom.Dataset) -> str:
    """Store and record a received image as the SCP does; returns its storage key."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    key = store.write_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
    ledger.record_instance(sop_instance_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                           series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
                           transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, storage_key=key,
                           patient_id=str(ds.PatientID))
    return key
