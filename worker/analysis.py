"""Analyse one study: select eligible images, decode, infer in batches, write SEG + SR.

The worker reads the images from shared storage by key and writes its results back there; it
never touches the node's ledger. What it returns (and sends to the node's export queue) is a
small JSON summary.
"""

from __future__ import annotations

import io
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from node.storage import InstanceStore, write_durably
from training.bundle import Bundle, load_bundle
from worker.inference.models import LoadedModels, load_models
from worker.inference.predict import predict_images
from worker.inference.preprocess import ImageDecodeError, decode_radiograph
from worker.inference.result import ImageFinding
from worker.inference.select import ineligibility_reason
from worker.writers.seg import build_seg
from worker.writers.sr import build_sr

log = logging.getLogger(__name__)


def _write_result(dataset: pydicom.Dataset, target: Path) -> None:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    write_durably(target, buffer.getvalue())


def failed_summary(study_uid: str, instances: list[dict[str, str]], reason: str) -> dict[str, Any]:
    """The summary of an analysis that could not run at all, so the ledger shows why."""
    return {
        "study_uid": study_uid,
        "model": {"name": "unavailable", "version": "unavailable", "synthetic_demo": False},
        "images": [
            {"sop_instance_uid": item["sop_instance_uid"], "status": "failed", "reason": reason, "probability": None,
             "flagged": None, "area_px": None, "area_cm2": None}
            for item in instances
        ],
        "results": [],
        "flagged": False,
        "analysed_at": datetime.now(timezone.utc).isoformat(),
    }


class StudyAnalyser:
    """Holds the loaded models; analyses studies one after another."""

    def __init__(self, storage_dir: Path, bundle: Bundle, device: str = "auto", batch_size: int = 8) -> None:
        self.storage_dir = storage_dir
        self.store = InstanceStore(storage_dir)
        self.bundle = bundle
        self.models: LoadedModels = load_models(bundle, device)
        self.batch_size = batch_size

    @classmethod
    def from_bundle_dir(cls, storage_dir: Path, bundle_dir: Path, device: str = "auto") -> "StudyAnalyser":
        return cls(storage_dir, load_bundle(bundle_dir), device)

    def _result_key(self, study_uid: str, sop_instance_uid: str) -> str:
        return f"results/{study_uid}/{sop_instance_uid}.dcm"

    def analyse(self, study_uid: str, instances: list[dict[str, str]]) -> dict[str, Any]:
        """Analyse the instances; one image's failure is recorded for that image alone."""
        identity = self.bundle.identity
        images: dict[str, dict[str, Any]] = {}
        candidates: list[tuple[str, Path]] = []
        for item in instances:
            sop_uid, key = item["sop_instance_uid"], item["key"]
            entry = images[sop_uid] = {
                "sop_instance_uid": sop_uid,
                "status": "not_analysed",
                "reason": None,
                "probability": None,
                "flagged": None,
                "area_px": None,
                "area_cm2": None,
            }
            try:
                path = self.store.path(key)
                header = pydicom.dcmread(path, stop_before_pixels=True)  # pixels only for eligible images
            except (OSError, ValueError, InvalidDicomError) as exc:
                entry.update(status="failed", reason=f"cannot read stored instance {key}: {exc}")
                continue
            reason = ineligibility_reason(header)
            if reason:
                entry["reason"] = reason
                continue
            candidates.append((sop_uid, path))

        recipe = self.bundle.manifest.preprocessing
        results: list[dict[str, Any]] = []
        for start in range(0, len(candidates), self.batch_size):
            batch: list[tuple[str, pydicom.Dataset, Any]] = []
            for sop_uid, path in candidates[start : start + self.batch_size]:
                try:
                    dataset = pydicom.dcmread(path)
                    batch.append((sop_uid, dataset, decode_radiograph(dataset, recipe)))
                except (OSError, InvalidDicomError, ImageDecodeError) as exc:
                    images[sop_uid].update(status="not_analysed", reason=f"unreadable image: {exc}")
            if not batch:
                continue
            findings = predict_images(
                self.models, [image for _, _, image in batch], [ds for _, ds, _ in batch], batch_size=self.batch_size
            )
            for (sop_uid, dataset, _), finding in zip(batch, findings):
                try:
                    results.extend(self._write_results(study_uid, sop_uid, dataset, finding))
                except Exception as exc:
                    log.exception("cannot write the results of an image")
                    images[sop_uid].update(status="failed", reason=f"cannot write results: {type(exc).__name__}: {exc}")
                    continue
                images[sop_uid].update(
                    status="analysed",
                    probability=round(float(finding.probability), 6),
                    flagged=bool(finding.flagged),
                    area_px=int(finding.area_px),
                    area_cm2=None if finding.area_cm2 is None else round(float(finding.area_cm2), 3),
                )
                log.info("image analysed: p=%.3f flagged=%s area_px=%d", finding.probability, finding.flagged,
                         finding.area_px)

        return {
            "study_uid": study_uid,
            "model": {"name": identity.name, "version": identity.version, "synthetic_demo": identity.synthetic_demo},
            "images": list(images.values()),
            "results": results,
            "flagged": any(bool(e["flagged"]) for e in images.values()),
            "analysed_at": datetime.now(timezone.utc).isoformat(),
        }

    def _write_results(
        self, study_uid: str, sop_uid: str, dataset: pydicom.Dataset, finding: ImageFinding
    ) -> list[dict[str, Any]]:
        identity = self.bundle.identity
        seg = build_seg(dataset, finding, identity)
        sr = build_sr(dataset, finding, seg, identity)
        written = []
        for kind, obj in (("SEG", seg), ("SR", sr)):
            key = self._result_key(study_uid, obj.SOPInstanceUID)
            _write_result(obj, self.store.path(key))
            written.append(
                {
                    "kind": kind,
                    "key": key,
                    "sop_instance_uid": str(obj.SOPInstanceUID),
                    "sop_class_uid": str(obj.SOPClassUID),
                    "source_sop_instance_uid": sop_uid,
                }
            )
        return written
