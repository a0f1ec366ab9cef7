"""Measurements of a pneumothorax mask: side from the image orientation, largest gap, hemithorax."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph
from training.synthetic import synthetic_dicom
from worker.inference.measure import column_direction, largest_gap, lung_fields, measure_mask
from worker.inference.predict import pixel_spacing_mm


def _header(orientation: list[str] | None) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    if orientation is not None:
        ds.PatientOrientation = orientation
    return ds


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [(["L", "F"], (1, False)), (["R", "F"], (-1, False)), (["LH", "F"], (1, False)), (["A", "F"], (None, False)),
     (None, (1, True)), ([], (1, True))],
)
def test_column_direction_follows_patient_orientation(orientation, expected) -> None:
    assert column_direction(_header(orientation)) == expected


def test_the_side_is_the_patients_not_the_images() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:40, 5:25] = True  # the image's left
    image = np.full((100, 100), 0.5, dtype=np.float32)
    assert measure_mask(mask, image, _header(["L", "F"]), None).side == "right"
    assert measure_mask(mask, image, _header(["R", "F"]), None).side == "left"
    assumed = measure_mask(mask, image, _header(None), None)
    assert (assumed.side, assumed.side_assumed) == ("right", True)
    assert measure_mask(mask, image, _header(["P", "F"]), None).side is None  # a lateral view


def test_a_mask_on_both_sides_is_bilateral() -> None:
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:40, 5:25] = True
    mask[20:35, 75:95] = True
    result = measure_mask(mask, np.full((100, 100), 0.5, dtype=np.float32), _header(["L", "F"]), None)
    assert result.side == "bilateral"


def test_an_empty_mask_has_no_measurements() -> None:
    result = measure_mask(np.zeros((50, 50), dtype=bool), np.zeros((50, 50)), _header(["L", "F"]), (0.2, 0.2))
    assert result == type(result)(None, False, None, None, None)


def test_largest_gap_is_the_widest_disc_in_the_mask() -> None:
    mask = np.zeros((200, 200), dtype=bool)
    mask[50:150, 80:120] = True  # a 40 px wide band
    gap_px, gap_mm = largest_gap(mask, (0.5, 0.25))
    assert gap_px == pytest.approx(40, abs=2)
    assert gap_mm == pytest.approx(40 * 0.25, abs=1)  # across the columns, 0.25 mm each
    assert largest_gap(mask, None)[1] is None


def test_lung_fields_are_found_on_a_synthetic_radiograph_and_the_fraction_grows_with_the_gap() -> None:
    ds, mask = synthetic_dicom(seed=0, positive=True, size=512)
    image = decode_radiograph(ds, Preprocessing())
    fields = lung_fields(image)
    assert fields is not None
    assert 0.1 < fields.mean() < 0.6
    truth_side = "right" if np.nonzero(mask)[1].mean() < 256 else "left"  # PA, orientation L\F

    measured = measure_mask(mask, image, ds, pixel_spacing_mm(ds))
    assert measured.side == truth_side and not measured.side_assumed
    assert measured.gap_mm is not None and measured.gap_mm > 0
    assert measured.hemithorax_fraction is not None and 0 < measured.hemithorax_fraction < 1

    smaller = mask & ~np.roll(mask, 12, axis=1) & ~np.roll(mask, -12, axis=1)
    fewer = measure_mask(smaller, image, ds, pixel_spacing_mm(ds))
    assert fewer.hemithorax_fraction is not None
    assert fewer.hemithorax_fraction < measured.hemithorax_fraction


def test_no_lung_field_on_a_flat_image() -> None:
    assert lung_fields(np.full((64, 64), 0.4, dtype=np.float32)) is None
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 5:15] = True
    assert measure_mask(mask, np.full((64, 64), 0.4), _header(["L", "F"]), None).hemithorax_fraction is None
