"""Analyse one study: select eligible images, decode, infer in batches, write SEG + SR.

The worker reads the images from shared storage by key and writes its results back there; it
never touches the node's ledger. What it returns (and sends to the node's export queue) is a
small JSON summary.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from node.storage import write_durably
from training.bundle import Bundle, load_bundle
from worker.inference.models import LoadedModels, load_models
from worker.inference.predict import predict_images
from worker.inference.preprocess import ImageDecodeError, decode_radiograph
from worker.inference.select import ineligibility_reason
from worker.writers.seg import build_seg
from worker.writers.sr import build_sr

log = logging.getLogger(__name__)


@dataclass
class _Candidate:
    sop_instance_uid: str
    dataset: pydicom.Dataset


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
        self.bundle = bundle
        self.models: LoadedModels = load_models(bundle, device)
        self.batch_size = batch_size

    @classmethod
    def from_bundle_dir(cls, storage_dir: Path, bundle_dir: Path, device: str = "auto") -> "StudyAnalyser":
        return cls(storage_dir, load_bundle(bundle_dir), device)

    def _result_key(self, study_uid: str, sop_instance_uid: str) -> str:
        return f"results/{study_uid}/{sop_instance_uid}.dcm"

    def analyse(self, study_uid: str, instances: list[dict[str, str]]) -> dict[str, Any]:
        identity = self.bundle.identity
        images: list[dict[str, Any]] = []
        candidates: list[_Candidate] = []
        for item in instances:
            sop_uid, key = item["sop_instance_uid"], item["key"]
            entry: dict[str, Any] = {
                "sop_instance_uid": sop_uid,
                "status": "not_analysed",
                "reason": None,
                "probability": None,
                "flagged": None,
                "area_px": None,
                "area_cm2": None,
            }
            images.append(entry)
            try:
                dataset = pydicom.dcmread(self.storage_dir / key)
            except (OSError, InvalidDicomError) as exc:
                entry.update(status="failed", reason=f"cannot read stored instance {key}: {exc}")
                continue
            reason = ineligibility_reason(dataset)
            if reason:
                entry["reason"] = reason
                continue
            candidates.append(_Candidate(sop_uid, dataset))

        decoded: list[tuple[_Candidate, Any]] = []
        recipe = self.bundle.manifest.preprocessing
        for cand in candidates:
            entry = next(e for e in images if e["sop_instance_uid"] == cand.sop_instance_uid)
            try:
                decoded.append((cand, decode_radiograph(cand.dataset, recipe)))
            except ImageDecodeError as exc:
                entry.update(status="not_analysed", reason=f"unreadable image: {exc}")

        results: list[dict[str, Any]] = []
        for start in range(0, len(decoded), self.batch_size):
            batch = decoded[start : start + self.batch_size]
            findings = predict_images(
                self.models, [img for _, img in batch], [c.dataset for c, _ in batch], batch_size=self.batch_size
            )
            for (cand, _), finding in zip(batch, findings):
                entry = next(e for e in images if e["sop_instance_uid"] == cand.sop_instance_uid)
                entry.update(
                    status="analysed",
                    probability=round(float(finding.probability), 6),
                    flagged=bool(finding.flagged),
                    area_px=int(finding.area_px),
                    area_cm2=None if finding.area_cm2 is None else round(float(finding.area_cm2), 3),
                )
                seg = build_seg(cand.dataset, finding, identity)
                sr = build_sr(cand.dataset, finding, seg, identity)
                for kind, obj in (("SEG", seg), ("SR", sr)):
                    key = self._result_key(study_uid, obj.SOPInstanceUID)
                    _write_result(obj, self.storage_dir / key)
                    results.append(
                        {
                            "kind": kind,
                            "key": key,
                            "sop_instance_uid": str(obj.SOPInstanceUID),
                            "sop_class_uid": str(obj.SOPClassUID),
                            "source_sop_instance_uid": cand.sop_instance_uid,
                        }
                    )
                log.info(
                    "study analysed image p=%.3f flagged=%s area_px=%d", finding.probability, finding.flagged,
                    finding.area_px,
                )

        return {
            "study_uid": study_uid,
            "model": {"name": identity.name, "version": identity.version, "synthetic_demo": identity.synthetic_demo},
            "images": images,
            "results": results,
            "flagged": any(bool(e["flagged"]) for e in images),
            "analysed_at": datetime.now(timezone.utc).isoformat(),
        }
