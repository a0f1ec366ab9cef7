"""The SEG, SR and GSPS writers, checked by dciodvfy and read back with highdicom.

Every object is built once per module (the RG radiographs are large) for each source case — the
pydicom-data radiographs in each of their transfer syntaxes, synthetic CR and DX, MONOCHROME1 and
2, 8 to 16 bits, with and without spacing, several character sets — and for a positive and an
empty finding. The SC writer has tests of its own (test_writer_sc.py).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import skimage.draw
from dicom_samples import (
    dciodvfy_errors,
    dciodvfy_warnings,
    pydicom_data_file,
    save_dataset,
    synthetic_radiograph,
)
from pydicom.uid import UID
from result_models import CLINICAL_MODEL, DEMO_MODEL

from contract.bundle import DEMO_INTENDED_USE, ModelIdentity
from worker.inference.result import ImageFinding
from worker.writers.common import DEMO_LABEL, describe
from worker.writers.gsps import build_gsps, outline_polylines
from worker.writers.seg import build_seg
from worker.writers.sr import AnalysedImage, SkippedImage, build_sr
from worker.writers.uids import result_uid


def source_variant(
    source: pydicom.Dataset, *, photometric: str | None = None, bits: int | None = None,
    charset: str | None = None, patient_name: str | None = None, orientation: list[str] | None = None,
) -> pydicom.Dataset:
    """``source`` (a 16-bit-allocated synthetic radiograph) with another photometric
    interpretation, bit depth (8 allocates 8 bits), character set or patient name."""
    ds = copy.deepcopy(source)
    pixels = ds.pixel_array.astype(np.float64) / ((1 << int(ds.BitsStored)) - 1)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
        ds.PhotometricInterpretation = "MONOCHROME1"
        if "PresentationLUTShape" in ds:
            ds.PresentationLUTShape = "INVERSE"
    if bits is not None:
        top = (1 << bits) - 1
        ds.BitsAllocated = 8 if bits <= 8 else 16
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.WindowCenter, ds.WindowWidth = top // 2, top
        dtype = np.uint8 if bits <= 8 else np.uint16
        ds.PixelData = np.round(pixels * top).astype(dtype).tobytes()
    elif photometric is not None:
        ds.PixelData = np.round(pixels * ((1 << int(ds.BitsStored)) - 1)).astype(np.uint16).tobytes()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    if patient_name is not None:
        ds.PatientName = patient_name
    if orientation is not None:
        ds.PatientOrientation = orientation
    return ds


def _rg(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(pydicom_data_file(name))


def _as_received(source: pydicom.Dataset, transfer_syntax: str) -> pydicom.Dataset:
    """``source`` written in ``transfer_syntax`` and read back, as the worker reads a stored instance."""
    if UID(transfer_syntax).is_compressed:
        source.compress(transfer_syntax)
    else:
        source.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


# name -> (how to get the source, the spacing the inference step measures areas with)
SOURCES = {
    # real CR, MONOCHROME1, 15 bits stored, Pixel Spacing present but 0\0, in each transfer syntax
    "rg1-cr-zero-spacing": (lambda: _rg("RG1_UNCR.dcm"), None),
    "rg1-cr-j2k-lossless": (lambda: _rg("RG1_J2KR.dcm"), None),
    "rg1-cr-j2k-lossy": (lambda: _rg("RG1_J2KI.dcm"), None),
    # real CR, MONOCHROME1, 10 bits stored, no spacing at all, orientation R\F
    "rg3-cr-no-spacing": (lambda: _rg("RG3_UNCR.dcm"), None),
    "rg3-cr-j2k-lossless": (lambda: _rg("RG3_J2KR.dcm"), None),
    "dx-imager-spacing": (lambda: synthetic_radiograph(imager_pixel_spacing=(0.4, 0.3)), (0.4, 0.3)),
    "dx-calibrated-spacing": (
        lambda: synthetic_radiograph(imager_pixel_spacing=(0.4, 0.4), pixel_spacing=(0.35, 0.36)),
        (0.35, 0.36),
    ),
    "dx-no-spacing": (lambda: synthetic_radiograph(imager_pixel_spacing=None), None),
    "cr-mono1-8bit": (
        lambda: source_variant(synthetic_radiograph(modality="CR"), photometric="MONOCHROME1", bits=8),
        (0.4, 0.4),
    ),
    "dx-mono2-16bit": (lambda: source_variant(synthetic_radiograph(), bits=16), (0.4, 0.4)),
    "dx-rle": (lambda: _as_received(synthetic_radiograph(), pydicom.uid.RLELossless), (0.4, 0.4)),
    "cr-mono1-deflated": (
        lambda: _as_received(
            source_variant(synthetic_radiograph(modality="CR"), photometric="MONOCHROME1"),
            pydicom.uid.DeflatedExplicitVRLittleEndian,
        ),
        (0.4, 0.4),
    ),
    "dx-utf8-no-orientation": (
        lambda: source_variant(
            synthetic_radiograph(), charset="ISO_IR 192", patient_name="Müller^Zoë=山田^太郎", orientation=[]
        ),
        (0.4, 0.4),
    ),
    "cr-latin1": (
        lambda: source_variant(synthetic_radiograph(modality="CR"), charset="ISO_IR 100", patient_name="Gómez^José"),
        (0.4, 0.4),
    ),
}
CASES = [(source, positive) for source in SOURCES for positive in (True, False)]
CASE_IDS = [f"{source}-{'positive' if positive else 'empty'}" for source, positive in CASES]
POSITIVE_CASES = [case for case in CASES if case[1]]
POSITIVE_IDS = [i for case, i in zip(CASES, CASE_IDS) if case[1]]
# Warnings dciodvfy may give: ones the source causes (RG1's retired PN form), the private coding
# scheme of the hemithorax fraction (declared in the SR), and an empty General Series Laterality
# in the GSPS, which dciodvfy requires as Type 2C and then says is "only permitted to be empty
# when actually unknown".
ALLOWED_WARNINGS = ("Retired Person Name form", "<99PLEURA>", "<Laterality(0020,0060)>")


def unexpected_warnings(path: Path) -> list[str]:
    return [w for w in dciodvfy_warnings(path) if not any(allowed in w for allowed in ALLOWED_WARNINGS)]


@dataclass
class Built:
    source: pydicom.Dataset
    finding: ImageFinding
    seg: hd.seg.Segmentation | None
    sr: hd.sr.ComprehensiveSR
    gsps: hd.pr.GrayscaleSoftcopyPresentationState
    seg_path: Path | None
    sr_path: Path
    gsps_path: Path
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
        side="right" if positive else None,
        side_assumed=positive and not source.get("PatientOrientation"),
        gap_px=2.0 * rows * 0.1 if positive else None,
        gap_mm=None if spacing is None or not positive else 2.0 * rows * 0.1 * spacing[0],
        hemithorax_fraction=0.23 if positive else None,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuiltCases:
    out = tmp_path_factory.mktemp("writers")
    results: BuiltCases = {}
    for name, (load, expected_spacing) in SOURCES.items():
        source = load()
        for positive in (True, False):
            finding = make_finding(source, positive, expected_spacing)
            seg = build_seg(source, finding, DEMO_MODEL) if positive else None
            sr = build_sr([AnalysedImage(source, finding, seg)], [], DEMO_MODEL)
            gsps = build_gsps(source, finding, DEMO_MODEL)
            stem = f"{name}-{'positive' if positive else 'empty'}"
            seg_path = save_dataset(seg, out / f"{stem}-seg.dcm") if seg is not None else None
            sr_path = save_dataset(sr, out / f"{stem}-sr.dcm")
            gsps_path = save_dataset(gsps, out / f"{stem}-gsps.dcm")
            results[(name, positive)] = Built(
                source, finding, seg, sr, gsps, seg_path, sr_path, gsps_path, expected_spacing
            )
    return results


# --- dciodvfy ----------------------------------------------------------------------------------


def test_synthetic_radiograph_is_valid_dx(tmp_path: Path) -> None:
    assert dciodvfy_errors(save_dataset(synthetic_radiograph(), tmp_path / "dx.dcm")) == []


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_seg_has_no_dciodvfy_errors(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert item.seg_path is not None
    assert dciodvfy_errors(item.seg_path) == []
    assert unexpected_warnings(item.seg_path) == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sr_has_no_dciodvfy_errors(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert dciodvfy_errors(item.sr_path) == []
    assert unexpected_warnings(item.sr_path) == []


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gsps_has_no_dciodvfy_errors(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert dciodvfy_errors(item.gsps_path) == []
    assert unexpected_warnings(item.gsps_path) == []


# --- context carried over from the source ---------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_results_belong_to_the_source_study_patient_and_character_set(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    source = item.source
    paths = [p for p in (item.seg_path, item.sr_path, item.gsps_path) if p is not None]
    for path in paths:
        result = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                        "AccessionNumber", "StudyDate", "StudyID"):
            assert result.get(keyword) == source.get(keyword), (path.name, keyword)
        assert result.get("SpecificCharacterSet") == source.get("SpecificCharacterSet"), path.name
        assert result.Manufacturer == "Pleura"
        assert result.SeriesInstanceUID != source.SeriesInstanceUID
    if "StudyDescription" in source:
        assert pydicom.dcmread(item.sr_path).StudyDescription == source.StudyDescription


def test_a_non_ascii_patient_name_survives_the_round_trip(built: BuiltCases) -> None:
    item = built[("dx-utf8-no-orientation", True)]
    for path in (item.seg_path, item.sr_path, item.gsps_path):
        assert path is not None
        assert str(pydicom.dcmread(path).PatientName) == "Müller^Zoë=山田^太郎"
    latin = built[("cr-latin1", False)]
    assert str(pydicom.dcmread(latin.gsps_path).PatientName) == "Gómez^José"
    assert pydicom.dcmread(latin.sr_path).SpecificCharacterSet == "ISO_IR 100"


# --- SEG read back -----------------------------------------------------------------------------


def test_no_seg_is_written_for_an_image_without_finding(built: BuiltCases) -> None:
    assert all(item.seg is None for (_, positive), item in built.items() if not positive)


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_seg_reads_back_with_the_finding_mask(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert item.seg_path is not None
    seg = hd.seg.segread(item.seg_path)

    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[item.source.SOPInstanceUID], segment_numbers=[1]
    )
    assert pixels.shape == (1, item.source.Rows, item.source.Columns, 1)
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), item.finding.mask)
    assert int(seg.NumberOfFrames) == 1

    description = seg.get_segment_description(1)
    assert description.segmented_property_type.value == "36118008"
    assert description.segmented_property_type.scheme_designator == "SCT"
    assert description.segmented_property_category.value == "49755003"
    assert description.algorithm_type.value == "AUTOMATIC"
    algorithm = description.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("pleura-demo", "0.1.0-demo")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_seg_is_pixel_aligned_with_the_source(built: BuiltCases, case: tuple[str, bool]) -> None:
    """No Frame of Reference: the SEG's one frame derives from the source, spatial locations kept,
    and it carries no Pixel Measures of its own (see worker.writers.seg)."""
    item = built[case]
    assert item.seg_path is not None
    seg = pydicom.dcmread(item.seg_path)
    assert (seg.Rows, seg.Columns) == (item.source.Rows, item.source.Columns)
    assert seg.PatientOrientation == (item.source.get("PatientOrientation") or "")
    assert "FrameOfReferenceUID" not in seg
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


# --- GSPS read back ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gsps_outlines_the_finding_on_the_source_with_its_display_pipeline(
    built: BuiltCases, case: tuple[str, bool]
) -> None:
    item = built[case]
    gsps = pydicom.dcmread(item.gsps_path)
    source = item.source
    assert gsps.Modality == "PR"
    referenced = gsps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    inverse = source.PhotometricInterpretation == "MONOCHROME1"
    assert gsps.PresentationLUTShape == ("INVERSE" if inverse else "IDENTITY")
    voi = gsps.SoftcopyVOILUTSequence[0]
    assert "WindowCenter" in voi or "VOILUTSequence" in voi

    annotation = gsps.GraphicAnnotationSequence[0]
    [text] = annotation.TextObjectSequence
    assert "AI result - not a diagnosis" in text.UnformattedTextValue
    assert DEMO_LABEL in text.UnformattedTextValue
    if not item.finding.flagged:
        assert "GraphicObjectSequence" not in annotation
        assert text.UnformattedTextValue.startswith("No pneumothorax suspected")
        return
    assert text.UnformattedTextValue.startswith("Pneumothorax suspected (right")
    polylines = [np.asarray(g.GraphicData, dtype=float).reshape(-1, 2) for g in annotation.GraphicObjectSequence]
    assert polylines and all(g.GraphicType == "POLYLINE" for g in annotation.GraphicObjectSequence)
    # Each outline is closed and lies on the mask's boundary: rasterised back, it covers the mask.
    drawn = np.zeros(item.finding.mask.shape, dtype=bool)
    for points in polylines:
        np.testing.assert_array_equal(points[0], points[-1])
        rr, cc = skimage.draw.polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, shape=drawn.shape)
        drawn[rr, cc] = True
    overlap = (drawn & item.finding.mask).sum() / (drawn | item.finding.mask).sum()
    assert overlap > 0.97


def test_gsps_makes_a_window_for_a_source_without_one() -> None:
    source = synthetic_radiograph()
    del source.WindowCenter, source.WindowWidth
    gsps = build_gsps(source, make_finding(source, positive=True), DEMO_MODEL)
    voi = gsps.SoftcopyVOILUTSequence[0]
    values = source.pixel_array
    assert values.min() <= float(voi.WindowCenter) <= values.max()
    assert 0 < float(voi.WindowWidth) <= float(values.max()) - float(values.min()) + 1


def test_outline_polylines_of_two_regions() -> None:
    mask = np.zeros((50, 60), dtype=bool)
    mask[5:15, 5:20] = True
    mask[30:45, 40:55] = True
    polylines = outline_polylines(mask)
    assert len(polylines) == 2
    for points in polylines:
        assert points[:, 0].min() >= 0 and points[:, 0].max() <= 60
        assert points[:, 1].min() >= 0 and points[:, 1].max() <= 50
    assert outline_polylines(np.zeros((10, 10), dtype=bool)) == []



def test_outline_polylines_do_not_depend_on_where_the_mask_lies() -> None:
    """The contours are traced on the mask's bounding box: the same mask placed elsewhere in a
    larger image gives the same polylines, shifted."""
    rng = np.random.default_rng(3)
    blob = rng.random((40, 50)) > 0.35
    alone = outline_polylines(blob)
    assert alone
    placed = np.zeros((300, 400), dtype=bool)
    placed[123:163, 211:261] = blob
    shifted = outline_polylines(placed)
    assert len(shifted) == len(alone)
    for small, large in zip(alone, shifted):
        np.testing.assert_allclose(large, small + [211, 123], atol=1e-9)

# --- SR read back ------------------------------------------------------------------------------


PlanarGroup = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
ImageGroup = hd.sr.MeasurementsAndQualitativeEvaluations


def _report(sr_path: Path) -> tuple[hd.sr.ComprehensiveSR, list[PlanarGroup], list[ImageGroup]]:
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr, sr.content.get_planar_roi_measurement_groups(), sr.content.get_image_measurement_groups()


def _measurements(group: PlanarGroup | ImageGroup) -> dict[tuple[str, str], float]:
    return {(m.name.value, m.unit.value): m.value for m in group.get_measurements()}


def _evaluations(group: PlanarGroup | ImageGroup) -> dict[str, str]:
    return {q.name.value: q.value.value for q in group.get_qualitative_evaluations()}


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_sr_reports_a_finding_with_its_measurements(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    finding = item.finding
    _, planar, image_groups = _report(item.sr_path)
    assert len(planar) == 1 and image_groups == []
    group = planar[0]

    assert group.finding_type.value == "36118008"
    values = _measurements(group)
    assert values[("111012", "1")] == pytest.approx(finding.probability)  # Certainty of Finding
    assert values[("122411", "1")] == pytest.approx(finding.threshold)  # Threshold Value
    assert values[("42798000", "{pixels}")] == finding.area_px
    assert values[("103355008", "{pixels}")] == pytest.approx(finding.gap_px, abs=0.01)  # Width (max)
    assert values[("HTXFRACTION", "%")] == pytest.approx(23.0)
    if item.expected_spacing is None:
        assert ("42798000", "cm2") not in values and ("103355008", "mm") not in values
    else:
        assert values[("42798000", "cm2")] == pytest.approx(finding.area_cm2)
        assert values[("103355008", "mm")] == pytest.approx(finding.gap_mm, abs=0.01)
    widths = [m for m in group.get_measurements() if m.name.value == "103355008"]
    assert all(m.derivation.value == "56851009" for m in widths)  # Maximum

    [site] = group.finding_sites
    assert site.value.value == "3120008" and site.laterality.value == "24028007"  # pleura, right

    evaluations = _evaluations(group)
    assert evaluations["36118008"] == "52101004"  # Present
    assert evaluations["111056"] == "111150"  # Rendering Intent: presentation required


@pytest.mark.parametrize("case", [c for c in CASES if not c[1]], ids=[i for c, i in zip(CASES, CASE_IDS) if not c[1]])
def test_sr_reports_a_negative_image(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    sr, planar, image_groups = _report(item.sr_path)
    assert planar == [] and len(image_groups) == 1
    group = image_groups[0]
    values = _measurements(group)
    assert values[("111012", "1")] == pytest.approx(item.finding.probability)
    assert values[("122411", "1")] == pytest.approx(item.finding.threshold)
    evaluations = _evaluations(group)
    assert evaluations["36118008"] == "272519000"  # Absent
    assert evaluations["111056"] == "111152"  # not for presentation
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {item.source.SOPInstanceUID}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sr_names_the_model(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    sr, planar, image_groups = _report(item.sr_path)
    [group] = planar + image_groups
    texts = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.TextValue)
        for i in group[0].ContentSequence
        if i.ValueType == "TEXT"
    }
    assert ("111001", "pleura-demo") in texts  # Algorithm Name
    assert ("111003", "0.1.0-demo") in texts  # Algorithm Version

    observer = sr.content[0].ContentSequence
    device = {
        i.ConceptNameCodeSequence[0].CodeValue: i for i in observer if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert device["121005"].ConceptCodeSequence[0].CodeValue == "121007"  # Observer Type: Device
    assert device["121013"].TextValue == "Pleura"  # Device Observer Name
    assert device["121015"].TextValue == "pleura-demo"  # Device Observer Model Name
    schemes = {s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence}
    assert "99PLEURA" in schemes


@pytest.mark.parametrize("case", POSITIVE_CASES, ids=POSITIVE_IDS)
def test_sr_references_the_source_and_the_seg(built: BuiltCases, case: tuple[str, bool]) -> None:
    item = built[case]
    assert item.seg is not None
    sr, [group], _ = _report(item.sr_path)
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

    # One tracking UID for the SEG segment, the SR group and the GSPS outline: one finding.
    segment = item.seg.SegmentSequence[0]
    tracking = {i.ConceptNameCodeSequence[0].CodeValue: i for i in group[0].ContentSequence}
    assert tracking["112040"].UID == segment.TrackingUID
    outline = item.gsps.GraphicAnnotationSequence[0].GraphicObjectSequence[0]
    assert outline.TrackingUID == segment.TrackingUID


def _comments(sr: pydicom.Dataset) -> list[str]:
    return [
        item.TextValue
        for item in sr.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"  # Comment
    ]


def test_side_assumed_without_orientation_is_said(built: BuiltCases) -> None:
    item = built[("dx-utf8-no-orientation", True)]
    comments = _comments(pydicom.dcmread(item.sr_path))
    assert any("side from the usual display convention" in c for c in comments)
    assert "assumed" in item.gsps.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue


# --- one report for a whole analysis -----------------------------------------------------------


@pytest.fixture(scope="module")
def study_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A study of four images: one with a finding, one without, a lateral view not analysed and
    one whose file could not be read."""
    out = tmp_path_factory.mktemp("study")
    first = synthetic_radiograph(seed=1)
    study = first.StudyInstanceUID
    second = synthetic_radiograph(study_instance_uid=study, seed=2)
    lateral = synthetic_radiograph(study_instance_uid=study, seed=3)
    lateral.ViewPosition = "LL"
    positive, negative = make_finding(first, True), make_finding(second, False)
    seg = build_seg(first, positive, DEMO_MODEL)
    analysed = [AnalysedImage(first, positive, seg), AnalysedImage(second, negative)]
    skipped = [
        SkippedImage(lateral.SOPInstanceUID, "lateral view (View Position LL)", lateral),
        SkippedImage("1.2.3.4.5", "cannot read stored instance: truncated file", None),
    ]
    sr = build_sr(analysed, skipped, DEMO_MODEL)
    path = save_dataset(sr, out / "study-sr.dcm")
    return {"sr": sr, "path": path, "seg": seg, "images": (first, second, lateral), "analysed": analysed,
            "skipped": skipped}


def test_study_report_is_valid(study_report: dict) -> None:
    assert dciodvfy_errors(study_report["path"]) == []
    assert unexpected_warnings(study_report["path"]) == []


def test_study_report_covers_every_image(study_report: dict) -> None:
    first, second, lateral = study_report["images"]
    sr, planar, image_groups = _report(study_report["path"])
    assert [g.referenced_segmentation_frame[1].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for g in planar] == [
        first.SOPInstanceUID
    ]
    by_image = {
        g.source_images[0].referenced_sop_instance_uid: _evaluations(g)["36118008"] for g in image_groups
    }
    assert by_image == {second.SOPInstanceUID: "272519000", lateral.SOPInstanceUID: "262008008"}  # Absent, Not performed
    comments = _comments(pydicom.dcmread(study_report["path"]))
    # Images are named by their place in the report and their numbers, never by a UID.
    assert "Image 3 (series 1, instance 1) not analysed: lateral view (View Position LL)" in comments
    assert "Image 4 (header unreadable) not analysed: cannot read stored instance: truncated file" in comments
    assert comments[0].startswith("Image 1 (series 1, instance 1): Present")
    assert comments[-2].startswith("Image 2 (series 1, instance 1): Absent") or any(
        c.startswith("Image 2 (series 1, instance 1): Absent") for c in comments
    )
    for uid in (first.SOPInstanceUID, second.SOPInstanceUID, lateral.SOPInstanceUID, "1.2.3.4.5"):
        assert not any(uid in c for c in comments)
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert evidence == {first.SOPInstanceUID, second.SOPInstanceUID, lateral.SOPInstanceUID,
                        study_report["seg"].SOPInstanceUID}
    assert sr.StudyInstanceUID == first.StudyInstanceUID


def test_a_study_not_analysed_gets_a_report_saying_why(tmp_path: Path) -> None:
    lateral = synthetic_radiograph()
    lateral.ViewPosition = "LL"
    sr = build_sr([], [SkippedImage(lateral.SOPInstanceUID, "lateral view (View Position LL)", lateral)], DEMO_MODEL)
    path = save_dataset(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    _, planar, [group] = _report(path)
    assert planar == [] and _evaluations(group)["36118008"] == "262008008"
    assert any("not analysed: lateral view" in c for c in _comments(sr))


def test_a_report_needs_one_readable_image() -> None:
    with pytest.raises(ValueError, match="no image of the analysis has a readable header"):
        build_sr([], [SkippedImage("1.2.3", "unreadable", None)], DEMO_MODEL)


def test_study_report_uid_depends_on_the_images_not_their_order(study_report: dict) -> None:
    analysed, skipped = study_report["analysed"], study_report["skipped"]
    again = build_sr(list(reversed(analysed)), list(reversed(skipped)), DEMO_MODEL)
    assert again.SOPInstanceUID == study_report["sr"].SOPInstanceUID
    fewer = build_sr(analysed[:1], [], DEMO_MODEL)
    assert fewer.SOPInstanceUID != study_report["sr"].SOPInstanceUID
    assert fewer.SeriesInstanceUID == study_report["sr"].SeriesInstanceUID


# --- demo label --------------------------------------------------------------------------------


def test_demo_model_results_say_so(built: BuiltCases) -> None:
    item = built[("dx-imager-spacing", True)]
    assert item.seg_path is not None
    seg, sr, gsps = (pydicom.dcmread(p) for p in (item.seg_path, item.sr_path, item.gsps_path))
    assert DEMO_LABEL in seg.SeriesDescription
    assert DEMO_LABEL in seg.ContentDescription
    assert DEMO_LABEL in sr.SeriesDescription
    assert DEMO_LABEL in gsps.SeriesDescription and DEMO_LABEL in gsps.ContentDescription
    comments = _comments(sr)
    # One intended-use comment, led by the demo label, after the image's decision.
    assert [c for c in comments if DEMO_LABEL in c] == [comments[-1]]
    assert DEMO_INTENDED_USE in comments[-1]
    assert comments[0].startswith("Image 1") and ": Present" in comments[0]


def test_clinical_model_results_carry_no_demo_label(tmp_path: Path) -> None:
    source = synthetic_radiograph()
    finding = make_finding(source, positive=True)
    seg = build_seg(source, finding, CLINICAL_MODEL)
    sr = build_sr([AnalysedImage(source, finding, seg)], [], CLINICAL_MODEL)
    gsps = build_gsps(source, finding, CLINICAL_MODEL)
    for ds, path in ((seg, tmp_path / "seg.dcm"), (sr, tmp_path / "sr.dcm"), (gsps, tmp_path / "gsps.dcm")):
        assert "SYNTHETIC" not in ds.SeriesDescription
        assert "pleura-cxr" in ds.SeriesDescription
        assert dciodvfy_errors(save_dataset(ds, path)) == []
    assert "SYNTHETIC" not in seg.ContentDescription
    assert "SYNTHETIC" not in gsps.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue
    assert _comments(sr)[-1] == f"Model pleura-cxr 2.3.1. Intended use: {CLINICAL_MODEL.intended_use}"
    assert not any("SYNTHETIC" in c for c in _comments(sr))


def test_descriptions_fit_a_long_string() -> None:
    long_model = replace(DEMO_MODEL, name="x" * 60, version="y" * 60)
    for model in (DEMO_MODEL, CLINICAL_MODEL, long_model):
        for kind in ("SEG", "SR", "GSPS", "SC", "pneumothorax SEG"):
            text = describe(kind, model)
            assert len(text) <= 64
            assert text.startswith(DEMO_LABEL) == model.synthetic_demo
    assert describe("SEG", CLINICAL_MODEL) == "Pleura SEG pleura-cxr 2.3.1"


# --- UIDs --------------------------------------------------------------------------------------


def test_same_inputs_give_the_same_uids_and_a_new_version_new_ones(built: BuiltCases) -> None:
    item = built[("rg3-cr-no-spacing", True)]
    assert item.seg is not None

    def build_all(model: ModelIdentity) -> list[pydicom.Dataset]:
        seg = build_seg(item.source, item.finding, model)
        sr = build_sr([AnalysedImage(item.source, item.finding, seg)], [], model)
        return [seg, sr, build_gsps(item.source, item.finding, model)]

    again = build_all(DEMO_MODEL)
    for first, second in zip((item.seg, item.sr, item.gsps), again):
        assert second.SOPInstanceUID == first.SOPInstanceUID
        assert second.SeriesInstanceUID == first.SeriesInstanceUID

    newer = build_all(replace(DEMO_MODEL, version="0.2.0-demo"))
    old = {uid for ds in (item.seg, item.sr, item.gsps) for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}
    new = {uid for ds in newer for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID)}
    assert len(old) == 6 and len(new) == 6
    assert old.isdisjoint(new)


def test_results_of_one_study_share_a_series_per_kind() -> None:
    first = synthetic_radiograph(seed=1)
    second = synthetic_radiograph(study_instance_uid=first.StudyInstanceUID, seed=2)
    for build in (build_seg, build_gsps):
        objects = [build(s, make_finding(s, True), DEMO_MODEL) for s in (first, second)]
        assert objects[0].SeriesInstanceUID == objects[1].SeriesInstanceUID
        assert objects[0].SOPInstanceUID != objects[1].SOPInstanceUID


def test_result_uid_is_a_deterministic_valid_uid() -> None:
    uid = result_uid("1.2.3", "pleura-demo", "0.1.0-demo", "SEG")
    assert uid == result_uid("1.2.3", "pleura-demo", "0.1.0-demo", "SEG")
    assert uid.startswith("2.25.")
    assert UID(uid).is_valid and len(uid) <= 64
    assert result_uid("ab", "c") != result_uid("a", "bc")  # parts cannot run into each other
    with pytest.raises(ValueError):
        result_uid()


# --- inputs it refuses ------------------------------------------------------------------------


def test_builders_refuse_a_mask_of_another_size() -> None:
    source = synthetic_radiograph(rows=64, columns=64)
    finding = make_finding(source, positive=True)
    finding = replace(finding, mask=np.ones((32, 64), dtype=bool))
    for build in (build_seg, build_gsps):
        with pytest.raises(ValueError, match="mask shape"):
            build(source, finding, DEMO_MODEL)


def test_builders_refuse_a_non_radiograph() -> None:
    source = synthetic_radiograph(rows=64, columns=64)
    source.SOPClassUID = pydicom.uid.CTImageStorage
    for build in (build_seg, build_gsps):
        with pytest.raises(ValueError, match="only CR and DX"):
            build(source, make_finding(source, positive=True), DEMO_MODEL)


def test_build_sr_refuses_the_seg_of_another_image(built: BuiltCases) -> None:
    item = built[("dx-imager-spacing", True)]
    other = synthetic_radiograph(study_instance_uid=item.source.StudyInstanceUID, rows=64, columns=64)
    with pytest.raises(ValueError, match="not made from this source"):
        build_sr([AnalysedImage(other, make_finding(other, positive=True), item.seg)], [], DEMO_MODEL)


def test_build_sr_refuses_a_flagged_image_without_seg() -> None:
    source = synthetic_radiograph(rows=64, columns=64)
    with pytest.raises(ValueError, match="has no SEG"):
        build_sr([AnalysedImage(source, make_finding(source, positive=True), None)], [], DEMO_MODEL)


def test_build_sr_refuses_images_of_two_studies() -> None:
    first, second = synthetic_radiograph(seed=1), synthetic_radiograph(seed=2)
    images = [AnalysedImage(s, make_finding(s, False)) for s in (first, second)]
    with pytest.raises(ValueError, match="one study"):
        build_sr(images, [], DEMO_MODEL)
