"""The CT phantom, series geometry, the 3D measurement and the CT result writers (multi-frame SEG,
volumetric SR), judged by dciodvfy and read back with highdicom."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_samples import dciodvfy_errors
from contract.bundle import DEMO_INTENDED_USE, ModelIdentity
from contract.ct_preprocess import SeriesError, series_geometry, slice_hu
from training.ct_synthetic import make_phantom, phantom_datasets
from worker.inference.ct_measure import measure_series
from worker.writers.common import DEMO_LABEL
from worker.writers.seg_ct import build_ct_seg
from worker.writers.sr_ct import build_ct_sr

MODEL = ModelIdentity("pleura-ct-test", "1.0", "Pleura", True, DEMO_INTENDED_USE)


@pytest.fixture(scope="module")
def phantom_series():
    phantom = make_phantom(11, slices=40, size=128, side="left")
    datasets = phantom_datasets(phantom)
    geometry = series_geometry(datasets)
    ordered = [datasets[i] for i in geometry.order]
    hu = np.stack([slice_hu(ds) for ds in ordered])
    return phantom, ordered, geometry, hu


def test_the_phantom_volume_follows_the_ellipsoid_cap_formula(phantom_series) -> None:
    phantom, _, _, _ = phantom_series
    assert phantom.side == "left"
    assert phantom.analytic_volume_ml > 50
    assert phantom.mask_volume_ml == pytest.approx(phantom.analytic_volume_ml, rel=0.05)


def test_slices_are_ordered_by_position_not_instance_number(phantom_series) -> None:
    phantom, ordered, geometry, hu = phantom_series
    z = [float(ds.ImagePositionPatient[2]) for ds in ordered]
    assert z == sorted(z)
    assert [int(ds.InstanceNumber) for ds in ordered] == list(range(40, 0, -1))  # written head first
    assert geometry.slice_spacing_mm == pytest.approx(phantom.slice_spacing_mm)
    assert np.allclose(hu, phantom.hu)  # rescale slope/intercept give back the phantom's HU


def test_a_gap_in_the_series_is_refused_with_the_reason(phantom_series) -> None:
    _, ordered, _, _ = phantom_series
    with pytest.raises(SeriesError, match="not evenly spaced"):
        series_geometry(ordered[:10] + ordered[12:])
    with pytest.raises(SeriesError, match="share one position"):
        series_geometry(ordered + ordered[:1])


def test_measuring_the_truth_gives_the_known_volume_side_and_fraction(phantom_series) -> None:
    phantom, _, geometry, hu = phantom_series
    outside = np.zeros_like(phantom.pneumothorax)
    outside[:, :4, :4] = True  # air outside the body: must be removed by the pleural-space check
    probabilities = (phantom.pneumothorax | outside).astype(np.float32)
    finding = measure_series(probabilities, hu, geometry, mask_threshold=0.5, min_volume_ml=1.0)
    assert finding.flagged and finding.side == "left"
    assert finding.removed_components == 1
    assert np.array_equal(finding.mask, phantom.pneumothorax)
    assert finding.volume_ml == pytest.approx(phantom.analytic_volume_ml, rel=0.05)
    assert finding.volume_ml == pytest.approx(phantom.mask_volume_ml, rel=1e-9)
    assert 0.05 < finding.hemithorax_fraction < 0.9


def test_ct_seg_and_sr_are_valid_and_describe_the_volume(phantom_series, tmp_path: Path) -> None:
    phantom, ordered, geometry, hu = phantom_series
    finding = measure_series(
        phantom.pneumothorax.astype(np.float32), hu, geometry, mask_threshold=0.5, min_volume_ml=1.0
    )
    seg = build_ct_seg(ordered, finding.mask, MODEL)
    sr = build_ct_sr(ordered, finding, seg, MODEL)
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg.save_as(seg_path)
    sr.save_as(sr_path)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []

    read = hd.seg.segread(seg_path)
    touched = [i for i in range(len(ordered)) if phantom.pneumothorax[i].any()]
    assert read.NumberOfFrames == len(touched)  # frames only where the mask is not empty
    assert read.FrameOfReferenceUID == ordered[0].FrameOfReferenceUID
    by_uid = {ds.SOPInstanceUID: index for index, ds in enumerate(ordered)}
    sources = []
    for frame in read.PerFrameFunctionalGroupsSequence:  # each frame at its source slice's position
        index = by_uid[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in ordered[index].ImagePositionPatient])
        sources.append(index)
    assert sorted(sources) == touched
    uids = [ds.SOPInstanceUID for ds in ordered]
    back = read.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)[..., 0]
    assert np.array_equal(back > 0, phantom.pneumothorax)
    assert DEMO_LABEL in read.SeriesDescription

    report = pydicom.dcmread(sr_path)
    items = _flatten(report.ContentSequence)
    volumes = [
        item.MeasuredValueSequence[0]
        for item in items
        if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == "118565006"
    ]
    assert len(volumes) == 1
    assert volumes[0].MeasurementUnitsCodeSequence[0].CodeValue == "ml"
    assert float(volumes[0].NumericValue) == pytest.approx(phantom.mask_volume_ml, abs=0.01)
    segment_refs = [item for item in items if item.get("ReferencedSOPSequence")]
    assert any(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID for ref in segment_refs)
    texts = " ".join(str(item.get("TextValue", "")) for item in items)
    assert "left" in texts and DEMO_LABEL in texts
    assert "CT series" in texts and str(ordered[0].SeriesInstanceUID) not in texts  # named by number, not UID
    assert any(
        item.get("ConceptCodeSequence") and item.ConceptCodeSequence[0].CodeValue == "7771000"  # Left
        for item in items
    )
    # Repeating the analysis gives the same objects (deterministic UIDs).
    assert build_ct_seg(ordered, finding.mask, MODEL).SOPInstanceUID == seg.SOPInstanceUID


def test_a_negative_ct_report_is_valid(phantom_series, tmp_path: Path) -> None:
    _, ordered, geometry, hu = phantom_series
    finding = measure_series(np.zeros(hu.shape, np.float32), hu, geometry, mask_threshold=0.5, min_volume_ml=1.0)
    assert not finding.flagged and finding.volume_ml == 0
    with pytest.raises(ValueError, match="empty"):
        build_ct_seg(ordered, finding.mask, MODEL)
    path = tmp_path / "sr.dcm"
    build_ct_sr(ordered, finding, None, MODEL).save_as(path)
    assert dciodvfy_errors(path) == []


def _flatten(sequence) -> list[pydicom.Dataset]:
    items = []
    for item in sequence:
        items.append(item)
        items.extend(_flatten(item.get("ContentSequence", [])))
    return items
