"""The SEG and SR writers, checked by dciodvfy and read back with highdicom.

Every object is built once per module (the RG radiographs are large) for each source case and for
a positive and an empty finding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from dicom_samples import (
    dciodvfy_errors,
    dciodvfy_warnings,
    pydicom_data_file,
    save_dataset,
    synthetic_radiograph,
)
from training.bundle import DEMO_INTENDED_USE, ModelIdentity
from worker.inference.result import ImageFinding
from worker.writers.seg import DEMO_LABEL, build_seg, describe
from worker.writers.sr import build_sr
from worker.writers.uids import result_uid

DEMO_MODEL = ModelIdentity(
    name="pleura-demo",
    version="0.1.0-demo",
    manufacturer="Pleura",
    synthetic_demo=True,
    intended_use=DEMO_INTENDED_USE,
)
CLINICAL_MODEL = ModelIdentity(
    name="pleura-cxr",
    version="2.3.1",
    manufacturer="Pleura",
    synthetic_demo=False,
    intended_use="Triage of suspected pneumothorax on adult chest radiographs",
)

# name -> (how to get the source, the spacing the inference step measures areas with)
SOURCES = {
    # real CR, MONOCHROME1, 15 bits stored, Pixel Spacing present but 0\0
    "rg1-cr-zero-spacing": (lambda: pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm")), None),
    # real CR, MONOCHROME1, 10 bits stored, no spacing at all
    "rg3-cr-no-spacing": (lambda: pydicom.dcmread(pydicom_data_file("RG3_UNCR.dcm")), None),
    "dx-imager-spacing": (lambda: synthetic_radiograph(imager_pixel_spacing=(0.4, 0.3)), (0.4, 0.3)),
    "dx-calibrated-spacing": (
        lambda: synthetic_radiograph(imager_pixel_spacing=(0.4, 0.4), pixel_spacing=(0.35, 0.36)),
        (0.35, 0.36),
    ),
    "dx-no-spacing": (lambda: synthetic_radiograph(imager_pixel_spacing=None), None),
}
CASES = [(source, positive) for source in SOURCES for positive in (True, False)]
CASE_IDS = [f"{source}-{'positive' if positive else 'empty'}" for source, positive in CASES]


@dataclass
class Built:
    source: pydicom.Dataset
    finding: ImageFinding
    seg: hd.seg.Segmentation
    sr: hd.sr.ComprehensiveSR
    seg_path: Path
    sr_path: Path
    expected_spacing: tuple[float, float] | None


BuiltCases = dict[tuple[str, bool], Built]  # (source name, positive) -> what was built


def make_finding(
    source: pydicom.Dataset, positive: bool, spacing: tuple[float, float] | None = (0.4, 0.4)
) -> ImageFinding:
    """A finding as the inference step would report it: an apical crescent, or nothing.

    ``spacing`` is the (row, column) spacing in mm the area in cm2 is computed with, None for none.
    """
    rows, columns = int(source.Rows), int(source.Columns)
    y, x = np.mgrid[0:rows, 0:columns]
    crescent = ((y - rows * 0.2) / (rows * 0.12)) ** 2 + ((x - columns * 0.3) / (columns * 0.1)) ** 2 < 1
    mask = crescent if positive else np.zeros((rows, columns), dtype=bool)
    area_px = int(mask.sum())
    area_cm2 = None if spacing is None else area_px * spacing[0] * spacing[1] / 100.0
    return ImageFinding(
        probability=0.91 if positive else 0.07,
        threshold=0.5,
        flagged=positive,
        mask=mask,
        area_px=area_px,
        area_cm2=area_cm2,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltCases:
    out = tmp_path_factory.mktemp("writers")
    results: BuiltCases = {}
    for name, (load, expected_spacing) in SOURCES.items():
        source = load()
        for positive in (True, False):
            finding = make_finding(source, positive, expected_spacing)
            seg = build_seg(source, finding, DEMO_MODEL)
            sr = build_sr(source, finding, seg, DEMO_MODEL)
            stem = f"{name}-{'positive' if positive else 'empty'}"
            seg_path, sr_path = out / f"{stem}-seg.dcm", out / f"{stem}-sr.dcm"
            save_dataset(seg, seg_path)
            save_dataset(sr, sr_path)
            results[(name, positive)] = Built(source, finding, seg, sr, seg_path, sr_path, expected_spacing)
    return results


# --- dciodvfy ----------------------------------------------------------------------------------


def test_synthetic_radiograph_is_valid_dx(tmp_path: Path) -> None:
    assert dciodvfy_errors(save_dataset(synthetic_radiograph(), tmp_path / "dx.dcm")) == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_seg_has_no_dciodvfy_errors(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert dciodvfy_errors(item.seg_path) == []
    # The only warning allowed is one the source itself causes (RG1's retired PN form).
    assert [w for w in dciodvfy_warnings(item.seg_path) if "ReferringPhysicianName" not in w] == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sr_has_no_dciodvfy_errors(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert dciodvfy_errors(item.sr_path) == []
    assert [w for w in dciodvfy_warnings(item.sr_path) if "ReferringPhysicianName" not in w] == []


# --- SEG read back -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_seg_reads_back_with_the_finding_mask(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    seg = hd.seg.segread(item.seg_path)

    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[item.source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, item.source.Rows, item.source.Columns, 1)
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), item.finding.mask)
    assert int(seg.NumberOfFrames) == 1  # the empty mask is written too

    description = seg.get_segment_description(1)
    assert description.segmented_property_type.value == "36118008"
    assert description.segmented_property_type.scheme_designator == "SCT"
    assert description.segmented_property_category.value == "49755003"
    assert description.algorithm_type.value == "AUTOMATIC"
    algorithm = description.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("pleura-demo", "0.1.0-demo")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_seg_belongs_to_the_source_study_and_patient(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    seg = pydicom.dcmread(item.seg_path)
    source = item.source
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert seg.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
    assert seg.PatientOrientation == source.PatientOrientation
    assert seg.Manufacturer == "Pleura"
    assert seg.ManufacturerModelName == "pleura-demo"
    assert seg.SoftwareVersions == "0.1.0-demo"
    assert "FrameOfReferenceUID" not in seg
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_seg_is_pixel_aligned_with_the_source(built: BuiltCases, case: tuple[str, bool]) -> None:
    """No Frame of Reference: the SEG's one frame derives from the source, spatial locations kept,
    and it carries no Pixel Measures of its own (see worker.writers.seg)."""
    item = built[case]
    seg = pydicom.dcmread(item.seg_path)
    assert (seg.Rows, seg.Columns) == (item.source.Rows, item.source.Columns)
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    frame = seg.PerFrameFunctionalGroupsSequence[0]
    assert "PlanePositionSequence" not in frame
    derived_from = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert derived_from.ReferencedSOPInstanceUID == item.source.SOPInstanceUID
    assert derived_from.SpatialLocationsPreserved == "YES"


def test_building_does_not_change_the_source(built: BuiltCases) -> None:
    source = built[("rg1-cr-zero-spacing", True)].source
    assert "PixelData" in source
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]


# --- SR read back ------------------------------------------------------------------------------


PlanarGroup = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations


def _group(sr_path: Path) -> tuple[hd.sr.ComprehensiveSR, PlanarGroup]:
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == 1
    return sr, groups[0]


def _measurements(group: PlanarGroup) -> dict[tuple[str, str], float]:
    return {(m.name.value, m.unit.value): m.value for m in group.get_measurements()}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sr_reports_the_finding(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    finding = item.finding
    _, group = _group(item.sr_path)

    assert group.finding_type.value == "36118008"
    values = _measurements(group)
    assert values[("111012", "1")] == pytest.approx(finding.probability)  # Certainty of Finding
    assert values[("122411", "1")] == pytest.approx(finding.threshold)  # Threshold Value
    assert values[("42798000", "{pixels}")] == finding.area_px
    if item.expected_spacing is None:
        assert ("42798000", "cm2") not in values
    else:
        assert values[("42798000", "cm2")] == pytest.approx(finding.area_cm2)

    evaluations = {q.name.value: q.value.value for q in group.get_qualitative_evaluations()}
    assert evaluations["36118008"] == ("52101004" if finding.flagged else "272519000")  # Present / Absent
    assert evaluations["111056"] == ("111150" if finding.flagged else "111152")  # Rendering Intent


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sr_names_the_model(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    sr, group = _group(item.sr_path)
    texts = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.TextValue)
        for i in group[0].ContentSequence
        if i.ValueType == "TEXT"
    }
    assert ("111001", "pleura-demo") in texts  # Algorithm Name
    assert ("111003", "0.1.0-demo") in texts  # Algorithm Version
    for measurement in group.get_measurements():
        names = {i.TextValue for i in measurement[0].ContentSequence if i.ValueType == "TEXT"}
        assert {"pleura-demo", "0.1.0-demo"} <= names

    observer = sr.content[0].ContentSequence
    device = {
        i.ConceptNameCodeSequence[0].CodeValue: i for i in observer if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert device["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # Observer Type: Device
    assert device["121013"].TextValue == "Pleura"  # Device Observer Name
    assert device["121015"].TextValue == "pleura-demo"  # Device Observer Model Name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sr_references_the_source_and_the_seg(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    sr, group = _group(item.sr_path)
    seg_uid, source_uid = item.seg.SOPInstanceUID, item.source.SOPInstanceUID

    frame = group.referenced_segmentation_frame
    assert frame is not None
    seg_reference = frame[0].ReferencedSOPSequence[0]
    assert seg_reference.ReferencedSOPInstanceUID == seg_uid
    assert seg_reference.ReferencedSOPClassUID == pydicom.uid.SegmentationStorage
    assert [int(n) for n in np.atleast_1d(seg_reference.ReferencedFrameNumber)] == [1]
    assert frame[1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid

    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {seg_uid, source_uid}
    assert sr.StudyInstanceUID == item.source.StudyInstanceUID
    assert sr.PatientID == item.source.PatientID

    # The SR's tracking UID is the SEG segment's: the two objects describe one finding.
    segment = item.seg.SegmentSequence[0]
    tracking = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group[0].ContentSequence}
    assert tracking["112040"].UID == segment.TrackingUID


def _comments(sr: pydicom.Dataset) -> list[str]:
    return [
        item.TextValue
        for item in sr.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"  # Comment
    ]


# --- demo label --------------------------------------------------------------------------------


def test_demo_model_results_say_so(built: BuiltCases) -> None:
    item = built[("dx-imager-spacing", True)]
    seg, sr = pydicom.dcmread(item.seg_path), pydicom.dcmread(item.sr_path)
    assert DEMO_LABEL in seg.SeriesDescription
    assert DEMO_LABEL in seg.ContentDescription
    assert DEMO_LABEL in sr.SeriesDescription
    comments = _comments(sr)
    assert len(comments) == 1 and DEMO_LABEL in comments[0]
    assert DEMO_INTENDED_USE in comments[0]


def test_clinical_model_results_carry_no_demo_label(tmp_path: Path) -> None:
    source = synthetic_radiograph()
    finding = make_finding(source, positive=True)
    seg = build_seg(source, finding, CLINICAL_MODEL)
    sr = build_sr(source, finding, seg, CLINICAL_MODEL)
    for ds, path in ((seg, tmp_path / "seg.dcm"), (sr, tmp_path / "sr.dcm")):
        assert "SYNTHETIC" not in ds.SeriesDescription
        assert "pleura-cxr" in ds.SeriesDescription
        assert dciodvfy_errors(save_dataset(ds, path)) == []
    assert "SYNTHETIC" not in seg.ContentDescription
    assert _comments(sr) == [f"Model pleura-cxr 2.3.1. Intended use: {CLINICAL_MODEL.intended_use}"]


def test_descriptions_fit_a_long_string() -> None:
    long_model = replace(DEMO_MODEL, name="x" * 60, version="y" * 60)
    for model in (DEMO_MODEL, CLINICAL_MODEL, long_model):
        for kind in ("SEG", "SR", "pneumothorax SEG"):
            text = describe(kind, model)
            assert len(text) <= 64
            assert text.startswith(DEMO_LABEL) == model.synthetic_demo
    assert describe("SEG", CLINICAL_MODEL) == "Pleura SEG pleura-cxr 2.3.1"


# --- UIDs --------------------------------------------------------------------------------------


def test_same_inputs_give_the_same_uids_and_a_new_version_new_ones(built: BuiltCases) -> None:
    item = built[("rg3-cr-no-spacing", True)]
    again_seg = build_seg(item.source, item.finding, DEMO_MODEL)
    again_sr = build_sr(item.source, item.finding, again_seg, DEMO_MODEL)
    assert again_seg.SOPInstanceUID == item.seg.SOPInstanceUID
    assert again_seg.SeriesInstanceUID == item.seg.SeriesInstanceUID
    assert again_sr.SOPInstanceUID == item.sr.SOPInstanceUID
    assert again_sr.SeriesInstanceUID == item.sr.SeriesInstanceUID

    newer = replace(DEMO_MODEL, version="0.2.0-demo")
    newer_seg = build_seg(item.source, item.finding, newer)
    newer_sr = build_sr(item.source, item.finding, newer_seg, newer)
    old = {uid for ds in (item.seg, item.sr) for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}
    new = {uid for ds in (newer_seg, newer_sr) for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}
    assert len(old) == 4 and len(new) == 4
    assert old.isdisjoint(new)


def test_results_of_one_study_share_a_series_per_kind() -> None:
    first = synthetic_radiograph(seed=1)
    second = synthetic_radiograph(study_instance_uid=first.StudyInstanceUID, seed=2)
    segs = [build_seg(s, make_finding(s, True), DEMO_MODEL) for s in (first, second)]
    assert segs[0].SeriesInstanceUID == segs[1].SeriesInstanceUID
    assert segs[0].SOPInstanceUID != segs[1].SOPInstanceUID


def test_result_uid_is_a_deterministic_valid_uid() -> None:
    uid = result_uid("1.2.3", "pleura-demo", "0.1.0-demo", "SEG")
    assert uid == result_uid("1.2.3", "pleura-demo", "0.1.0-demo", "SEG")
    assert uid.startswith("2.25.")
    assert UID(uid).is_valid and len(uid) <= 64
    assert result_uid("ab", "c") != result_uid("a", "bc")  # parts cannot run into each other
    with pytest.raises(ValueError):
        result_uid()


# --- inputs it refuses ------------------------------------------------------------------------


def test_build_seg_refuses_a_mask_of_another_size() -> None:
    source = synthetic_radiograph(rows=64, columns=64)
    finding = make_finding(source, positive=True)
    finding = replace(finding, mask=np.ones((32, 64), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        build_seg(source, finding, DEMO_MODEL)


def test_build_seg_refuses_a_non_radiograph() -> None:
    source = synthetic_radiograph(rows=64, columns=64)
    source.SOPClassUID = pydicom.uid.CTImageStorage
    with pytest.raises(ValueError, match="only CR and DX"):
        build_seg(source, make_finding(source, positive=True), DEMO_MODEL)


def test_build_sr_refuses_the_seg_of_another_image(built: BuiltCases) -> None:
    item = built[("dx-imager-spacing", True)]
    other = synthetic_radiograph(study_instance_uid=item.source.StudyInstanceUID, rows=64, columns=64)
    with pytest.raises(ValueError, match="not made from this source"):
        build_sr(other, make_finding(other, positive=True), item.seg, DEMO_MODEL)
