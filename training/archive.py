"""Pleura's own archive as a training set: the studies the node received, labelled by the
radiologists' feedback (the retraining loop).

The labels come from :meth:`node.ledger.Ledger.feedback_export`, the same export the worklist
offers: a rejected study makes each of its images a negative; a confirmed (or already known)
study makes its flagged images positives, outlined by the SEG Pleura wrote; a corrected study
makes its corrected image a positive outlined by the radiologist's own drawing; a Segmentation
sent back to Pleura makes each image it references a positive with that outline, or a negative
when its outline is empty. Images the
feedback says nothing about are listed as unlabelled, never guessed. Masks are kept as SIIM-ACR
RLE strings at each image's size, so the archive trains exactly like a SIIM-ACR set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from training.dataset_index import DatasetError, DatasetIndex, Example, Problem
from training.rle import rle_encode
from training.synthetic import SYNTHETIC_PATIENT_NAME

LEDGER_FILE = "ledger.sqlite"


def _mask_from_png(path: Path, rows: int, columns: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as picture:
        mask = np.asarray(picture.convert("L")) > 0
    if mask.shape != (rows, columns):
        raise ValueError(f"the drawn outline is {mask.shape[1]}x{mask.shape[0]}, the image {columns}x{rows}")
    return mask


def read_archive(
    storage_dir: Path | str, *, ledger_url: str | None = None, skip_bad: bool = False
) -> DatasetIndex:
    """The labelled images of the node's storage directory (ledger: ``ledger_url``, default the
    SQLite ledger in it). Raises :class:`DatasetError` naming the file for an unusable image,
    unless ``skip_bad``, which leaves it out and reports it."""
    from node.ledger import Ledger  # the node's ledger; imported here so training needs it only for archives
    from node.seg_labels import seg_mask  # with the ledger: only for archives

    root = Path(storage_dir)
    url = ledger_url or f"sqlite:///{root / LEDGER_FILE}"
    if ledger_url is None and not (root / LEDGER_FILE).is_file():
        raise DatasetError(f"{root}: no {LEDGER_FILE}: not a Pleura storage directory (or give the ledger URL)")
    ledger = Ledger(url)
    try:
        studies = ledger.feedback_export()
    finally:
        ledger.close()

    examples: list[Example] = []
    problems: list[Problem] = []
    unlabelled: list[Path] = []
    label_file = root / LEDGER_FILE
    for study in studies:
        for image in study["images"]:
            path = root / image["instance_key"]
            if image["label"] is None:
                unlabelled.append(path)
                continue
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                rows, columns = int(header.Rows), int(header.Columns)
                rles: tuple[str, ...] = ()
                if image["label"] == 1:
                    if image.get("mask_key"):
                        mask = _mask_from_png(root / image["mask_key"], rows, columns)
                    elif image.get("seg_key"):
                        mask = seg_mask(root / image["seg_key"], str(image["sop_instance_uid"]), rows, columns)
                    else:
                        raise ValueError("a positive without an outline (no SEG and no drawn mask)")
                    rles = (rle_encode(mask),)
            except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
                message = f"{path}: {exc} (study feedback by {study.get('user')})"
                if not skip_bad:
                    raise DatasetError(message) from None
                problems.append(Problem(path, None, str(exc)))
                continue
            examples.append(
                Example(
                    image_id=str(image["sop_instance_uid"]),
                    path=path,
                    patient_id=str(header.get("PatientID") or study["study_uid"]),
                    positive=image["label"] == 1,
                    rles=rles,
                    height=rows,
                    width=columns,
                    synthetic=str(header.get("PatientName", "")) == SYNTHETIC_PATIENT_NAME,
                )
            )
    return DatasetIndex("archive", root, label_file, examples, problems, unlabelled)
