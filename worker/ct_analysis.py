"""Analyse one CT series: order the slices, HU, window, segment every slice in batches, clean the
3D mask, measure the volume, write the multi-frame SEG and the SR.

The series is analysed as a whole or not at all: a slice that is not a CT slice, a geometry that
does not form one volume (two orientations, a missing slice) or pixel data that will not decode
leaves every slice not analysed with the reason, and the SR says so, as the radiograph path does
(:mod:`worker.analysis`). The summary has one line per slice, in the form the node's ledger
records for radiographs, plus the series' volume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

from contract.bundle import Bundle, load_bundle
from contract.ct_preprocess import SeriesError, ct_network_input, ct_slice_problem, series_geometry, slice_hu
from contract.messages import AnalysisOptions, AnalysisSummary, ImageEntry, InstanceRef, ReportedModel, ResultEntry, analysed_now
from contract.networks import load_segmenter
from contract.preprocess import ImageDecodeError, mask_to_source
from node.privacy import error_text, ref
from node.storage import InstanceStore
from worker.analysis import CRASHED_VARIANT, _rounded
from worker.image_jobs import write_result
from worker.inference.ct_measure import SeriesFinding, measure_series
from worker.writers.seg_ct import build_ct_seg
from worker.writers.sr import SkippedImage, build_sr
from worker.writers.sr_ct import CT_OF_CHEST, build_ct_sr, volume_text

__all__ = ["SeriesAnalyser", "segment_series"]

log = logging.getLogger(__name__)


def segment_series(
    network: torch.nn.Module, device: torch.device, hu: np.ndarray, bundle: Bundle, batch_size: int
) -> np.ndarray:
    """Voxel probabilities (slices, rows, columns) on the series' grid: every slice through the
    bundle's recipe, ``batch_size`` slices per forward pass, mapped back to the source grid."""
    recipe = bundle.manifest.network_preprocessing(bundle.manifest.segmenter)
    probabilities = np.empty(hu.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(hu), batch_size):
            batch = torch.from_numpy(ct_network_input(hu[start : start + batch_size], recipe)).to(device)
            output = torch.sigmoid(network(batch)).float().cpu().numpy()[:, 0]
            for offset, grid in enumerate(output):
                probabilities[start + offset] = mask_to_source(grid, hu.shape[1:])
    return probabilities


class SeriesAnalyser:
    """Holds the loaded CT U-Net; analyses series one after another."""

    def __init__(self, storage_dir: Path, bundle: Bundle, device: str = "auto", batch_size: int = 16) -> None:
        self.store = InstanceStore(storage_dir)
        self.bundle = bundle
        self.network, self.device = load_segmenter(bundle, device)
        self.batch_size = batch_size

    @classmethod
    def from_bundle_dir(cls, storage_dir: Path, bundle_dir: Path, device: str = "auto") -> "SeriesAnalyser":
        return cls(storage_dir, load_bundle(bundle_dir), device)

    def _store(self, study_uid: str, kind: str, obj: pydicom.Dataset) -> ResultEntry:
        storage_key = f"results/{study_uid}/{obj.SOPInstanceUID}.dcm"
        write_result(obj, self.store.path(storage_key))
        return ResultEntry(
            kind=kind,
            storage_key=storage_key,
            sop_instance_uid=str(obj.SOPInstanceUID),
            sop_class_uid=str(obj.SOPClassUID),
        )

    def analyse(
        self,
        study_uid: str,
        series_instance_uid: str,
        instances: list[dict[str, str]],
        options: AnalysisOptions | dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Analyse the slices of one series; returns the summary for the node (see the module docstring).

        ``options`` are the node's :class:`~contract.messages.AnalysisOptions` (or their wire form);
        the CT path writes its SEG and SR whatever they name (the destinations' object lists decide
        what is sent).
        """
        identity = self.bundle.identity
        refs = [InstanceRef.from_message(item) for item in instances]
        images = {item.sop_instance_uid: ImageEntry(sop_instance_uid=item.sop_instance_uid) for item in refs}
        datasets: dict[str, pydicom.Dataset] = {}
        # A series whose analysis killed its worker twice is reported without running the network.
        crashed = AnalysisOptions.from_message(options or {}).not_analysed_reason
        problem: str | None = str(crashed) if crashed else None
        for item in refs:
            sop_uid = item.sop_instance_uid
            try:
                ds = pydicom.dcmread(self.store.path(item.storage_key))
            except (OSError, ValueError, InvalidDicomError) as exc:
                log.warning("cannot read stored instance %s: %s", ref(sop_uid), exc)
                images[sop_uid].analysis_status = "failed"
                images[sop_uid].analysis_reason = f"the stored instance cannot be read ({error_text(exc)})"
                continue
            datasets[sop_uid] = ds
            reason = ct_slice_problem(ds)
            if reason:
                images[sop_uid].analysis_reason = reason
                problem = problem or f"the series has a slice that is not analysed ({reason})"

        finding: SeriesFinding | None = None
        results: list[ResultEntry] = []
        ordered: list[pydicom.Dataset] = []
        if datasets and problem is None:
            try:
                geometry = series_geometry(list(datasets.values()))
                ordered = [list(datasets.values())[i] for i in geometry.order]
                hu = np.stack([slice_hu(ds) for ds in ordered])
            except ImageDecodeError as exc:
                problem = exc.reason
            except SeriesError as exc:
                problem = str(exc)
            else:
                for ds in ordered:
                    del ds.PixelData  # the volume is in ``hu``; the writers need the headers only
                probabilities = segment_series(self.network, self.device, hu, self.bundle, self.batch_size)
                thresholds = self.bundle.manifest.thresholds
                finding = measure_series(
                    probabilities, hu, geometry, mask_threshold=thresholds.mask, min_volume_ml=thresholds.min_volume_ml
                )
                del probabilities, hu
                log.info("CT series analysed: %d slices, %s", len(ordered), volume_text(finding))

        if finding is not None:
            seg = build_ct_seg(ordered, finding.mask, identity) if finding.flagged else None
            if seg is not None:
                results.append(self._store(study_uid, "SEG", seg))
            results.append(self._store(study_uid, "SR", build_ct_sr(ordered, finding, seg, identity)))
            pixel_area_cm2 = geometry.pixel_spacing_mm[0] * geometry.pixel_spacing_mm[1] / 100.0
            for ds, section in zip(ordered, finding.mask):
                area = int(section.sum())
                images[str(ds.SOPInstanceUID)] = ImageEntry(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    analysis_status="analysed",
                    probability=round(float(finding.probability), 6),
                    flagged=bool(area),
                    area_px=area,
                    area_cm2=_rounded(area * pixel_area_cm2, 3),
                    side=finding.side if area else None,
                    hemithorax_fraction=_rounded(finding.hemithorax_fraction, 4) if area else None,
                )
        else:
            problem = problem or "no readable slice"
            for entry in images.values():
                if entry.analysis_status != "failed":
                    entry.analysis_reason = entry.analysis_reason or f"CT series not analysed: {problem}"
            skipped = [
                SkippedImage(sop_uid, entry.analysis_reason or entry.analysis_status, datasets.get(sop_uid))
                for sop_uid, entry in images.items()
            ]
            if datasets:
                report = build_sr([], skipped, identity, CT_OF_CHEST, variant=CRASHED_VARIANT if crashed else None)
                results.append(self._store(study_uid, "SR", report))

        return AnalysisSummary(
            study_uid=study_uid,
            series_instance_uid=series_instance_uid,
            model=ReportedModel(
                name=identity.name, version=identity.version, synthetic_demo=identity.synthetic_demo
            ),
            images=list(images.values()),
            results=results,
            flagged=bool(finding and finding.flagged),
            volume_ml=round(finding.volume_ml, 2) if finding else None,
            side=finding.side if finding else None,
            hemithorax_fraction=_rounded(finding.hemithorax_fraction, 4) if finding else None,
            analysed_at=analysed_now(),
        ).to_message()
