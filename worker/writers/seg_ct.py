"""The multi-frame DICOM SEG of a CT series: the pneumothorax mask over the whole volume.

One binary segment, "Pneumothorax", in the series' own voxel grid: highdicom takes the slices
(ordered by position) and the 3D mask, writes one frame per slice the mask touches
(``omit_empty_frames``) with that slice's Plane Position (Patient), the shared Plane Orientation
and Pixel Measures (Pixel Spacing, Slice Thickness, Spacing Between Slices), and the series'
Frame of Reference, and references each frame's source slice. A viewer overlays it on the CT in
3D; the SR's volumetric measurement group references its segment.

UIDs are derived from the source series and the model version (:mod:`worker.writers.uids`), so a
repeated analysis replaces the SEG instead of duplicating it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
from highdicom.seg import Segmentation

from contract.bundle import ModelIdentity
from worker.writers.common import SERIES_NUMBERS, carry_context, equipment, source_header
from worker.writers.seg import pneumothorax_seg
from worker.writers.uids import result_uid, series_uid

__all__ = ["build_ct_seg", "ct_series_result_identity", "ct_tracking_uid"]


def ct_tracking_uid(source_series_uid: str, model: ModelIdentity) -> str:
    """The UID that ties the SEG's segment to the SR's volumetric measurement group of one series."""
    return result_uid(source_series_uid, model.name, model.version, "CT-TRACKING")


def ct_series_result_identity(source: pydicom.Dataset, model: ModelIdentity, kind: str) -> dict[str, Any]:
    """Series, instance UIDs, numbers and equipment of a ``kind`` result about a whole CT series."""
    return {
        "series_instance_uid": series_uid(source.StudyInstanceUID, model, kind),
        "series_number": SERIES_NUMBERS[kind],
        "sop_instance_uid": result_uid(source.SeriesInstanceUID, model.name, model.version, f"CT-{kind}"),
        "instance_number": 1,
        **equipment(model),
    }


def build_ct_seg(sources: Sequence[pydicom.Dataset], mask: np.ndarray, model: ModelIdentity) -> Segmentation:
    """A binary multi-frame SEG of ``mask`` (slices, rows, columns) on ``sources``, the series'
    slices in the mask's slice order. Raises ValueError when the shapes disagree or the mask is empty."""
    volume = np.asarray(mask, dtype=bool)
    if volume.ndim != 3 or volume.shape[0] != len(sources):
        raise ValueError(f"mask shape {volume.shape} does not match {len(sources)} source slices")
    first = sources[0]
    if volume.shape[1:] != (first.Rows, first.Columns):
        raise ValueError(f"mask slices {volume.shape[1:]} do not match the source ({first.Rows}, {first.Columns})")
    if not volume.any():
        raise ValueError("the mask is empty: a SEG is written only for a finding")
    headers = [source_header(ds) for ds in sources]
    seg = pneumothorax_seg(
        headers, volume, model, ct_tracking_uid(first.SeriesInstanceUID, model),
        ct_series_result_identity(first, model, "SEG"), what="CT pneumothorax SEG", omit_empty_frames=True,
    )
    return carry_context(seg, first)
