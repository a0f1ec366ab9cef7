"""The Structured Report of a CT series: one TID 1500 Measurement Report with the volume.

Content tree (Comprehensive SR; the measurement references a segment, not 3D coordinates)::

    Imaging Measurement Report (TID 1500)
      Language, Device Observer "Pleura" (model name, manufacturer), Procedure Reported: CT of chest
      Imaging Measurements
        with a finding: Volumetric ROI Measurement Group (TID 1411) = the SEG's segment
          Tracking Identifier / UID (the SEG segment's Tracking UID)
          Finding: Pneumothorax; Finding Category: Morphologically abnormal structure
          Finding Site: Pleural structure, Laterality Right / Left / Bilateral
          Algorithm Identification (TID 4019): model name, version, family AI, manufacturer
          Referenced Segment -> the SEG's segment 1, Source Series For Segmentation -> the CT series
          Volume (SCT 118565006) in mL (UCUM "ml")
          Fraction of hemithorax (99PLEURA, %) when the hemithorax could be measured
          Certainty of Finding = largest voxel probability in the pleural space (UCUM "1")
          Threshold Value = the voxel probability threshold (UCUM "1")
          Pneumothorax = Present; Rendering Intent = Presentation Required
        without a finding: Measurement Group (TID 1501)
          Certainty of Finding, Threshold Value; Pneumothorax = Absent; Not for Presentation
      Comment: the volume, side and fraction in words; the model's intended use (demo warning first)

The codes, units and the parts both reports share are in :mod:`worker.writers.sr_content`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from highdicom.seg import Segmentation
from highdicom.sr import (
    CodedConcept,
    ComprehensiveSR,
    MeasurementsAndQualitativeEvaluations,
    ReferencedSegment,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from contract.bundle import ModelIdentity
from worker.inference.ct_measure import SeriesFinding
from worker.writers.common import FINDING_CATEGORY, PNEUMOTHORAX, source_header
from worker.writers.seg import SEGMENT_NUMBER
from worker.writers.seg_ct import ct_series_result_identity, ct_tracking_uid
from worker.writers.sr_content import (
    certainty,
    comprehensive_sr,
    decision_evaluations,
    finding_sites,
    hemithorax_measurement,
    intended_use_text,
    measurement,
    measurement_report,
    sr_algorithm,
    tracking_text,
)

__all__ = ["CT_OF_CHEST", "UNIT_ML", "VOLUME", "build_ct_sr", "volume_text"]

VOLUME = codes.SCT.Volume  # SCT 118565006
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
CT_OF_CHEST = Code("169069000", "SCT", "CT of chest")


def volume_text(finding: SeriesFinding) -> str:
    """The finding in words, for the report's comment and the logs (no identifiers)."""
    if not finding.flagged:
        return "No pneumothorax suspected"
    fraction = (
        f", {100.0 * finding.hemithorax_fraction:.1f} % of the hemithorax"
        if finding.hemithorax_fraction is not None
        else ""
    )
    return f"Pneumothorax suspected ({finding.side}): volume {finding.volume_ml:.1f} mL{fraction}"


def build_ct_sr(
    sources: Sequence[pydicom.Dataset], finding: SeriesFinding, seg: Segmentation | None, model: ModelIdentity
) -> ComprehensiveSR:
    """The TID 1500 report of one CT series' analysis; ``seg`` is the series' SEG when flagged.

    Raises ValueError when a flagged finding has no SEG or the SEG belongs to another series.
    """
    if not sources:
        raise ValueError("cannot write a CT report without the series' slices")
    first = sources[0]
    headers = [source_header(ds) for ds in sources]
    algorithm = sr_algorithm(model)
    tracking = TrackingIdentifier(uid=ct_tracking_uid(first.SeriesInstanceUID, model), identifier=tracking_text(model))
    measurements = certainty(round(float(finding.probability), 6), float(finding.threshold), algorithm)
    group: VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    if finding.flagged:
        if seg is None:
            raise ValueError("a flagged CT series needs its SEG to reference")
        referenced = {
            series.SeriesInstanceUID for series in seg.get("ReferencedSeriesSequence", [])
        }
        if first.SeriesInstanceUID not in referenced:
            raise ValueError("the SEG was not made from this CT series")
        volume = [measurement(VOLUME, round(finding.volume_ml, 2), UNIT_ML, algorithm)]
        if finding.hemithorax_fraction is not None:
            volume.append(hemithorax_measurement(finding.hemithorax_fraction, algorithm))
        group = VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=SEGMENT_NUMBER,
                source_series=SourceSeriesForSegmentation(first.SeriesInstanceUID),
            ),
            finding_type=PNEUMOTHORAX,
            finding_category=FINDING_CATEGORY,
            finding_sites=finding_sites(finding.side),
            algorithm_id=algorithm,
            measurements=volume + measurements,
            qualitative_evaluations=decision_evaluations(True),
        )
    else:
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=PNEUMOTHORAX,
            finding_category=FINDING_CATEGORY,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=decision_evaluations(False),
        )
    # The series by its number and description, never its UID: free text carries no identifiers.
    number, description = first.get("SeriesNumber"), str(first.get("SeriesDescription") or "").strip()
    series = "CT series" + (f" {number}" if number not in (None, "") else "") + (f" ({description})" if description else "")
    comments = [f"{series}: {volume_text(finding)}", intended_use_text(model)]
    report = measurement_report(model, CT_OF_CHEST, [group], comments)
    identity = {k: v for k, v in ct_series_result_identity(first, model, "SR").items() if k != "device_serial_number"}
    return comprehensive_sr(report, headers + ([seg] if seg is not None else []), identity, model, first)
