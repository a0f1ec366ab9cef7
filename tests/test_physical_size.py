"""Sizes in mm at the patient: which spacing attribute they come from, and the report saying so."""

from __future__ import annotations

import highdicom as hd
import pytest
from pydicom.dataset import Dataset

from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser
from worker.inference.predict import physical_spacing


def _spacing(**attributes) -> Dataset:
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_calibrated_pixel_spacing_is_used_as_it_is():
    ds = _spacing(PixelSpacing=[0.15, 0.15], PixelSpacingCalibrationType="GEOMETRY", ImagerPixelSpacing=[0.2, 0.2],
                  EstimatedRadiographicMagnificationFactor=1.1)
    found = physical_spacing(ds)
    assert (found.row_mm, found.column_mm) == pytest.approx((0.15, 0.15))
    assert found.source == "Pixel Spacing, calibrated at the patient (GEOMETRY)"


def test_imager_spacing_is_corrected_by_the_magnification_factor():
    found = physical_spacing(_spacing(ImagerPixelSpacing=[0.2, 0.3], EstimatedRadiographicMagnificationFactor=1.25))
    assert (found.row_mm, found.column_mm) == pytest.approx((0.16, 0.24))
    assert found.source == "Imager Pixel Spacing corrected by Estimated Radiographic Magnification Factor 1.25"


def test_imager_spacing_without_a_factor_says_it_is_at_the_detector():
    found = physical_spacing(_spacing(ImagerPixelSpacing=[0.2, 0.2]))
    assert (found.row_mm, found.column_mm) == pytest.approx((0.2, 0.2))
    assert found.source == "Imager Pixel Spacing at the detector, not corrected for magnification"


def test_an_uncalibrated_pixel_spacing_equal_to_the_imager_spacing_is_the_detectors():
    ds = _spacing(PixelSpacing=[0.2, 0.2], ImagerPixelSpacing=[0.2, 0.2], EstimatedRadiographicMagnificationFactor=1.1)
    found = physical_spacing(ds)
    assert found.row_mm == pytest.approx(0.2 / 1.1)
    assert found.source.startswith("Imager Pixel Spacing corrected")


def test_a_pixel_spacing_alone_is_used_and_its_calibration_called_unknown():
    found = physical_spacing(_spacing(PixelSpacing=[0.17, 0.17]))
    assert found.row_mm == pytest.approx(0.17) and found.source == "Pixel Spacing (calibration not stated)"


def test_a_pixel_spacing_that_differs_from_the_imager_spacing_without_a_calibration_type_is_used_as_stated():
    """Pixel Spacing other than the Imager Pixel Spacing says someone calibrated it, but not how: it is
    used (neither the imager spacing nor the magnification factor), and the report says so."""
    ds = _spacing(PixelSpacing=[0.17, 0.18], ImagerPixelSpacing=[0.2, 0.2], EstimatedRadiographicMagnificationFactor=1.1)
    found = physical_spacing(ds)
    assert (found.row_mm, found.column_mm) == pytest.approx((0.17, 0.18))
    assert found.source == "Pixel Spacing (calibration not stated)"


def test_no_usable_spacing_means_no_mm():
    assert physical_spacing(_spacing()) is None
    assert physical_spacing(_spacing(PixelSpacing=[0, 0])) is None
    assert physical_spacing(_spacing(ImagerPixelSpacing=[0.2, 0], EstimatedRadiographicMagnificationFactor=1.2)) is None


@pytest.fixture(scope="module")
def analyser(tmp_path_factory, demo_bundle):
    return StudyAnalyser.from_bundle_dir(tmp_path_factory.mktemp("size"), demo_bundle, device="cpu")


SPACINGS = {
    "calibrated": (
        {"PixelSpacing": [0.15, 0.15], "PixelSpacingCalibrationType": "GEOMETRY", "ImagerPixelSpacing": [0.2, 0.2],
         "EstimatedRadiographicMagnificationFactor": 1.25},
        0.15, "Pixel Spacing, calibrated at the patient (GEOMETRY)",
    ),
    "magnification": (
        {"ImagerPixelSpacing": [0.2, 0.2], "EstimatedRadiographicMagnificationFactor": 1.25},
        0.16, "Imager Pixel Spacing corrected by Estimated Radiographic Magnification Factor 1.25",
    ),
    "detector": (
        {"ImagerPixelSpacing": [0.2, 0.2]}, 0.2, "Imager Pixel Spacing at the detector, not corrected for magnification",
    ),
    "calibration not stated": (
        {"PixelSpacing": [0.17, 0.17], "ImagerPixelSpacing": [0.2, 0.2], "EstimatedRadiographicMagnificationFactor": 1.25},
        0.17, "Pixel Spacing (calibration not stated)",
    ),
    "none": ({}, None, None),
}


@pytest.mark.parametrize("case", list(SPACINGS))
def test_the_report_says_which_spacing_its_mm_come_from(analyser, case):
    attributes, spacing_mm, wording = SPACINGS[case]
    source, _ = synthetic_dicom(seed=77, positive=True, size=512)
    for keyword in ("PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
                    "ImagerPixelSpacing", "EstimatedRadiographicMagnificationFactor"):
        if keyword in source:
            delattr(source, keyword)
    for keyword, value in attributes.items():
        setattr(source, keyword, value)
    key = f"instances/size/{case.replace(' ', '-')}.dcm"
    (analyser.storage_dir / key).parent.mkdir(parents=True, exist_ok=True)
    source.save_as(analyser.storage_dir / key, enforce_file_format=True)
    summary = analyser.analyse(
        source.StudyInstanceUID, [{"sop_instance_uid": source.SOPInstanceUID, "key": key}], {"objects": ["SR"]}
    )
    [image] = summary["images"]
    assert image["flagged"] is True
    [report] = [r for r in summary["results"] if r["kind"] == "SR"]
    sr = hd.sr.srread(analyser.storage_dir / report["key"])
    comments = [item.TextValue for item in sr.content[0].ContentSequence if item.ValueType == "TEXT"]
    if spacing_mm is None:
        assert image["area_cm2"] is None
        assert "Image 1 (series 1, instance 1): no usable pixel spacing; sizes in pixels only" in comments
    else:
        assert image["area_cm2"] == pytest.approx(image["area_px"] * spacing_mm * spacing_mm / 100, rel=1e-3)
        assert f"Image 1 (series 1, instance 1): sizes in mm from {wording}" in comments
