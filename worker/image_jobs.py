"""The per-image work around the forward pass: decode an image, build and write its result objects.

The same functions run in the worker's own process (``analysis_processes`` = 0) and in the
analysis pool (:mod:`worker.pool`), so both write the same bytes. The pool's jobs
(:func:`decode_job`, :func:`write_job`) take file paths and shared-memory handles, not images:
a pool process reads the stored file itself and maps the decoded image the worker holds. They
return small values and report a per-image failure as text (their exceptions would have to
cross the process boundary; the worker logs and records them as it does its own).
"""

from __future__ import annotations

import dataclasses
import io
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from contract.bundle import ModelIdentity, Preprocessing
from contract.messages import ResultEntry
from contract.preprocess import ImageDecodeError, decode_radiograph
from node.privacy import error_text
from node.storage import InstanceStore, write_durably
from worker.inference.measure import bounding_box
from worker.inference.result import ImageFinding
from worker.pool import attached
from worker.stage_times import StageTimes
from worker.writers.gsps import build_gsps
from worker.writers.sc import build_sc
from worker.writers.seg import build_seg

__all__ = [
    "DEFER_SIZE", "CompactMask", "decode_image", "decode_job", "store_result", "write_image_results", "write_job",
    "write_result",
]

DEFER_SIZE = 64 * 1024
"""Values larger than this (bytes) are read from the stored file only when used: the pixel data."""

Handle = tuple[str, tuple[int, ...], str]
"""A shared-memory block as :attr:`worker.pool.SharedArray.handle` gives it."""


def write_result(dataset: pydicom.Dataset, target: Path) -> None:
    """``dataset`` as a DICOM file at ``target``, durably (fsync, then rename), as every result is written."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_durably(target, buffer.getvalue())


def result_storage_key(study_uid: str, sop_instance_uid: str) -> str:
    return f"results/{study_uid}/{sop_instance_uid}.dcm"


def store_result(
    store: InstanceStore, study_uid: str, kind: str, obj: pydicom.Dataset, source_sop_uid: str | None
) -> ResultEntry:
    """Write ``obj`` under the study's results and describe it for the summary."""
    storage_key = result_storage_key(study_uid, obj.SOPInstanceUID)
    write_result(obj, store.path(storage_key))
    return ResultEntry(
        kind=kind,
        storage_key=storage_key,
        sop_instance_uid=str(obj.SOPInstanceUID),
        sop_class_uid=str(obj.SOPClassUID),
        source_sop_instance_uid=source_sop_uid,
    )


def decode_image(dataset: pydicom.Dataset, recipe: Preprocessing) -> tuple[np.ndarray | None, str | None, str | None]:
    """(the decoded image, None, None), or (None, the reason it cannot be analysed, what to log or None)."""
    try:
        return decode_radiograph(dataset, recipe), None, None
    except ImageDecodeError as exc:
        return None, f"unreadable image: {exc.reason}", None
    except (OSError, InvalidDicomError) as exc:
        reason = f"unreadable image: the pixel data cannot be read ({error_text(exc)})"
        return None, reason, f"cannot read the pixel data: {exc}"


def write_image_results(
    store: InstanceStore,
    model: ModelIdentity,
    study_uid: str,
    sop_uid: str,
    dataset: pydicom.Dataset,
    image: np.ndarray,
    finding: ImageFinding,
    objects: set[str] | frozenset[str],
    heat: np.ndarray | None,
    times: StageTimes | None = None,
) -> tuple[Any, list[ResultEntry]]:
    """The SEG (flagged images), GSPS and SC of one image: (the SEG or None, their summaries).
    ``times`` gets the seconds each object took to build and write."""
    times = times or StageTimes()
    built: list[tuple[str, pydicom.Dataset]] = []
    seg = None
    # A classifier-only bundle has no segmentation: its region is a Grad-CAM, never a SEG.
    if finding.flagged and not finding.is_gradcam_region:
        with times.timing("SEG"):
            seg = build_seg(dataset, finding, model)
        built.append(("SEG", seg))
    if "GSPS" in objects:
        with times.timing("GSPS"):
            built.append(("GSPS", build_gsps(dataset, finding, model)))
    if "SC" in objects:
        with times.timing("SC"):
            built.append(("SC", build_sc(dataset, image, finding, model, heat)))
    entries = []
    for kind, obj in built:  # all built before any is written: an image's objects are written together or not at all
        with times.timing(kind):
            entries.append(store_result(store, study_uid, kind, obj, sop_uid))
    return seg, entries


@dataclasses.dataclass(frozen=True)
class CompactMask:
    """A source-sized boolean mask as its bounding box's contents: what a pool process needs of a
    finding's mask (a negative image's is empty, a pneumothorax covers a small part)."""

    shape: tuple[int, int]
    top: int = 0
    left: int = 0
    crop: np.ndarray | None = None

    @classmethod
    def of(cls, mask: np.ndarray) -> "CompactMask":
        mask = np.asarray(mask, dtype=bool)
        shape = (int(mask.shape[0]), int(mask.shape[1]))
        if not mask.any():
            return cls(shape)
        rows, columns = bounding_box(mask)
        return cls(shape, int(rows.start), int(columns.start), np.ascontiguousarray(mask[rows, columns]))

    def expand(self) -> np.ndarray:
        mask = np.zeros(self.shape, dtype=bool)
        if self.crop is not None:
            mask[self.top : self.top + self.crop.shape[0], self.left : self.left + self.crop.shape[1]] = self.crop
        return mask


def decode_job(path: str, recipe: Preprocessing, image: Handle) -> tuple[str | None, str | None, float]:
    """In a pool process: decode the file at ``path`` into the block ``image`` (the size its
    Rows and Columns give). Returns (None, None, seconds), or the reason the image cannot be
    analysed and what the worker should log, and the seconds it took."""
    started = time.perf_counter()
    try:
        dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except (OSError, ValueError, InvalidDicomError) as exc:
        reason = f"unreadable image: the pixel data cannot be read ({error_text(exc)})"
        return reason, f"cannot read: {exc}", time.perf_counter() - started
    decoded, reason, warning = decode_image(dataset, recipe)
    if decoded is None:
        return reason, warning, time.perf_counter() - started
    with attached(image) as target:
        if decoded.shape != target.shape:
            raise ValueError(
                f"decoded image has shape {decoded.shape} but its source has Rows, Columns {target.shape}"
            )
        np.copyto(target, decoded, casting="no")
    return None, None, time.perf_counter() - started


def write_job(
    storage_dir: str,
    model: ModelIdentity,
    study_uid: str,
    sop_uid: str,
    path: str,
    image: Handle,
    finding: ImageFinding,
    mask: CompactMask,
    objects: frozenset[str],
    heat: Handle | None,
) -> tuple[list[ResultEntry] | None, str | None, str | None, dict[str, float]]:
    """In a pool process: :func:`write_image_results` of one image, whose header is read again from
    ``path`` and whose decoded picture (and heat map) are mapped from the worker's blocks.
    Returns (the summaries of what was written, None, None, seconds per object), or (None, the
    error in words, its traceback, seconds per object)."""
    times = StageTimes()
    try:
        dataset = pydicom.dcmread(path, defer_size=DEFER_SIZE)
        whole = dataclasses.replace(finding, mask=mask.expand())
        with attached(image) as picture, (nullcontext() if heat is None else attached(heat)) as heat_map:
            _, entries = write_image_results(
                InstanceStore(Path(storage_dir)), model, study_uid, sop_uid, dataset, picture, whole, objects,
                heat_map, times,
            )
        return entries, None, None, times.seconds
    except Exception as exc:
        return None, error_text(exc), traceback.format_exc(), times.seconds
