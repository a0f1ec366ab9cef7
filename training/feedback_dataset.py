"""The radiologists' feedback as a data set in the SIIM-ACR layout (`pleura dataset export-feedback`).

:func:`training.archive.read_archive` labels the node's stored images from the ledger's feedback
(confirmed, rejected, corrected outlines, Segmentations sent back); :func:`export_feedback_dataset`
writes those images and labels where any SIIM-ACR reader (:func:`training.datasets.read_siim`,
`pleura dataset check`) takes them: ``dicom-images-train/<study>/<series>/<sop>.dcm``, a
``train-rle.csv`` with one row per image (its outline as RLE, ``-1`` for none), and
``provenance.json`` saying where the set came from (counts only: no identifiers). With
``deidentify`` the DICOM copies are de-identified (:mod:`training.deidentify`) and the CSV names
them by their new SOP Instance UIDs.
"""

from __future__ import annotations

import csv
import json
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pydicom

from training.archive import read_archive
from training.datasets import DatasetError, DatasetIndex, Problem
from training.deidentify import KEY_FILE, DateOption, DeidentificationError, Deidentifier, load_key
from training.rle import EMPTY_RLE
from training.synthetic import SIIM_CSV_HEADER, SIIM_CSV_NAME, SIIM_IMAGE_DIR

PROVENANCE_FILE = "provenance.json"
FEEDBACK_DATA_DIR = "feedback-data"
"""Where `pleura train --from-feedback` exports the feedback, inside its run directory."""


@dataclass(frozen=True)
class FeedbackExport:
    """What was written: the data set directory and the archive it came from."""

    out: Path
    images: int
    positives: int
    patients: int
    deidentified: bool
    archive: DatasetIndex
    problems: list[Problem]


def export_feedback_dataset(
    storage_dir: Path | str,
    out: Path | str,
    *,
    ledger_url: str | None = None,
    deidentify: bool = False,
    dates: DateOption = "remove",
    key_file: Path | None = None,
    skip_bad: bool = False,
    on_image: Callable[[int, int], None] | None = None,
) -> FeedbackExport:
    """Write the labelled images of a storage directory as a SIIM-ACR layout data set in ``out``
    (which must be empty or absent). ``key_file`` holds the de-identification key (default:
    ``<storage_dir>/deidentify.key``, made on first use); ``dates`` is the de-identification's date option
(:class:`training.deidentify.Deidentifier`). ``on_image(done, total)`` reports progress.

    Raises :class:`DatasetError` for an unusable image (unless ``skip_bad``), an ``out`` that
    holds files, or an archive with no labelled image.
    """
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"{root}: not an empty directory; give a new --out")
    archive = read_archive(storage_dir, ledger_url=ledger_url, skip_bad=skip_bad)
    if not archive.examples:
        raise DatasetError(
            f"{storage_dir}: no image is labelled yet (confirm, reject or correct studies on the worklist, "
            "or send Segmentations back)"
        )
    deidentifier = None
    if deidentify:
        deidentifier = Deidentifier(load_key(key_file or Path(storage_dir) / KEY_FILE), dates=dates)

    # Written beside ``out`` and renamed into place at the end: an export that stops half-way
    # leaves nothing behind, and ``out`` is either absent or complete.
    partial = root.parent / f".{root.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        written = _write(archive, partial, deidentifier, skip_bad=skip_bad, on_image=on_image)
        if root.exists():
            root.rmdir()
        partial.rename(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    images, positives, patients, problems = written
    return FeedbackExport(root, images, positives, patients, deidentifier is not None, archive, problems)


def write_image(ds: pydicom.Dataset, images_dir: Path) -> Path:
    """Write ``ds`` at ``<study>/<series>/<sop>.dcm`` under ``images_dir`` (the SIIM-ACR layout: the
    file names are the UIDs, the de-identified ones when the copy is); returns the path."""
    target = images_dir / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def _write(
    archive: DatasetIndex,
    root: Path,
    deidentifier: Deidentifier | None,
    *,
    skip_bad: bool,
    on_image: Callable[[int, int], None] | None,
) -> tuple[int, int, int, list[Problem]]:
    """Write the SIIM-ACR layout of ``archive`` into ``root``; returns (images, positives, patients,
    images left out)."""
    images_dir = root / SIIM_IMAGE_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    problems = list(archive.problems)
    rows: list[tuple[str, str]] = []
    patients: set[str] = set()
    positives = 0
    for done, example in enumerate(archive.examples, start=1):
        try:
            ds = pydicom.dcmread(example.path)
            if deidentifier is not None:
                ds = deidentifier.apply(ds)
        except (OSError, ValueError, DeidentificationError) as exc:
            message = f"{example.path}: {exc}"
            if not skip_bad:
                raise DatasetError(f"{message} (use --skip-bad to leave such images out)") from None
            problems.append(Problem(example.path, None, str(exc)))
            continue
        write_image(ds, images_dir)
        image_id = str(ds.SOPInstanceUID)
        rows.extend((image_id, " " + rle) for rle in (example.rles or (EMPTY_RLE,)))
        patients.add(str(ds.get("PatientID") or "") or example.patient_id)
        positives += example.positive
        if on_image is not None:
            on_image(done, len(archive.examples))
    with (root / SIIM_CSV_NAME).open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(SIIM_CSV_HEADER)
        writer.writerows(rows)
    images = len({image_id for image_id, _ in rows})
    provenance = {
        "source": "Pleura archive labelled by radiologists' feedback (pleura dataset export-feedback)",
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images": images,
        "positives": positives,
        "patients": len(patients),
        "synthetic_images": sum(example.synthetic for example in archive.examples),
        "unlabelled_images_left_out": len(archive.unlabelled),
        "images_skipped": len(problems),
        "deidentified": deidentifier is not None,
        "deidentification_method": "; ".join(deidentifier.method) if deidentifier is not None else None,
    }
    (root / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return images, positives, len(patients), problems
