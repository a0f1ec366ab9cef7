"""SIIM-ACR run-length encoding, the synthetic radiograph generator and the SIIM-layout writer."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
import torch

from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph
from training.rle import rle_decode, rle_encode
from training.synthetic import synthetic_chest_image, synthetic_dicom, write_siim_dataset

torch.set_num_threads(min(2, torch.get_num_threads()))


def test_rle_known_example_is_column_major_and_relative():
    mask = np.array(
        [
            [0, 1, 1],
            [0, 0, 1],
        ],
        dtype=bool,
    )
    # Column-major: column 0 = 0 0, column 1 = 1 0, column 2 = 1 1 -> flat 0 0 1 0 1 1.
    # Runs start at 2 (length 1) and 4 (length 2); the second offset counts from the end of the
    # first run (pixel 3), so it is 1. Row-major would have given "1 2 2 1".
    assert rle_encode(mask) == "2 1 1 2"
    decoded = rle_decode("2 1 1 2", width=3, height=2)
    assert decoded.dtype == bool and decoded.shape == (2, 3)
    assert np.array_equal(decoded, mask)


def test_rle_empty_mask_is_minus_one():
    assert rle_encode(np.zeros((4, 5), dtype=bool)) == "-1"
    for text in ("-1", " -1", ""):
        decoded = rle_decode(text, width=5, height=4)
        assert decoded.shape == (4, 5) and not decoded.any()


@pytest.mark.parametrize("shape", [(7, 11), (32, 20), (1, 9)])
def test_rle_round_trip_on_non_square_masks(shape):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    mask[-1, -1] = True  # a run that ends on the very last pixel
    mask[0, 0] = True  # and one that starts on the first
    text = rle_encode(mask)
    assert text.split()[0] == "0"
    assert np.array_equal(rle_decode(text, width=shape[1], height=shape[0]), mask)


def test_rle_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="odd number"):
        rle_decode("1 2 3", width=4, height=4)
    with pytest.raises(ValueError, match="beyond"):
        rle_decode("10 10", width=4, height=4)
    with pytest.raises(ValueError, match="not a run-length"):
        rle_decode("a b", width=4, height=4)


def test_synthetic_image_is_deterministic_and_the_pneumothorax_is_dark_and_local():
    image, mask = synthetic_chest_image(11, True, 128)
    again, mask_again = synthetic_chest_image(11, True, 128)
    assert image.dtype == np.uint16 and mask.dtype == bool and image.shape == mask.shape == (128, 128)
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert image.max() < 4096 and image.std() > 200
    assert 0.003 < mask.mean() < 0.2
    other, _ = synthetic_chest_image(12, True, 128)
    assert not np.array_equal(image, other)

    negative, no_mask = synthetic_chest_image(11, False, 128)
    assert not no_mask.any()
    # Same seed, same anatomy: the images differ only in and around the pneumothorax ...
    around = mask.copy()
    for _ in range(4):
        around |= np.roll(around, 1, 0) | np.roll(around, -1, 0) | np.roll(around, 1, 1) | np.roll(around, -1, 1)
    assert np.array_equal(image[~around], negative[~around])
    # ... where it is darker (air without lung markings).
    assert image[mask].astype(float).mean() < negative[mask].astype(float).mean() - 100


def test_synthetic_dicom_is_a_labelled_dx_for_presentation(tmp_path):
    ds, mask = synthetic_dicom(5, True, size=96)
    path = tmp_path / "synthetic.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
    assert back.Modality == "DX" and back.PresentationIntentType == "FOR PRESENTATION"
    assert back.PhotometricInterpretation == "MONOCHROME2"
    assert (back.BitsAllocated, back.BitsStored, back.HighBit) == (16, 12, 11)
    assert str(back.PatientName) == "SYNTHETIC^DEMO" and back.PatientID
    assert "SYNTHETIC" in back.SeriesDescription.upper()
    assert back.ViewPosition == "PA" and back.BodyPartExamined == "CHEST"
    assert [float(v) for v in back.ImagerPixelSpacing] == pytest.approx([430 / 96] * 2, rel=1e-5)
    assert back.StudyDate and back.StudyInstanceUID and back.SeriesInstanceUID
    assert back.pixel_array.shape == mask.shape == (96, 96)
    assert back.pixel_array.max() < 4096
    assert decode_radiograph(back, Preprocessing()).shape == (96, 96)
    same, _ = synthetic_dicom(5, True, size=96)
    assert same.SOPInstanceUID == ds.SOPInstanceUID and same.PixelData == ds.PixelData
    assert synthetic_dicom(5, False, size=96)[0].SOPInstanceUID != ds.SOPInstanceUID


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_write_siim_dataset_layout_and_csv(tmp_path):
    root = write_siim_dataset(tmp_path / "siim", n=6, size=64, positive_fraction=0.5, seed=3)
    assert root == tmp_path / "siim"
    text = (root / "train-rle.csv").read_text()
    assert text.splitlines()[0] == "ImageId, EncodedPixels"
    rows = _read_csv(root / "train-rle.csv")[1:]
    assert len(rows) == 6

    files = sorted((root / "dicom-images-train").rglob("*.dcm"))
    assert len(files) == 6
    by_uid = {}
    for path in files:
        study, series = path.parent.parent.name, path.parent.name
        ds = pydicom.dcmread(path)
        assert path.relative_to(root).parts[0] == "dicom-images-train" and len(path.relative_to(root).parts) == 4
        assert (study, series, path.stem) == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        by_uid[ds.SOPInstanceUID] = ds

    positives = 0
    for image_id, encoded in rows:
        assert image_id in by_uid
        assert encoded.startswith(" ")
        ds = by_uid[image_id]
        mask = rle_decode(encoded, width=ds.Columns, height=ds.Rows)
        if encoded.strip() == "-1":
            assert not mask.any()
        else:
            positives += 1
            assert mask.any()
            # The mask marks where the image is dark: inside the pneumothorax, well below the body.
            assert ds.pixel_array[mask].mean() < np.median(ds.pixel_array)
    assert positives == 3


def test_write_siim_dataset_is_deterministic_by_seed(tmp_path):
    first = write_siim_dataset(tmp_path / "a", n=3, size=64, seed=9)
    second = write_siim_dataset(tmp_path / "b", n=3, size=64, seed=9)
    other = write_siim_dataset(tmp_path / "c", n=3, size=64, seed=10)
    assert (first / "train-rle.csv").read_text() == (second / "train-rle.csv").read_text()
    assert (first / "train-rle.csv").read_text() != (other / "train-rle.csv").read_text()
    relative = lambda root: sorted(p.relative_to(root) for p in root.rglob("*.dcm"))  # noqa: E731
    assert relative(first) == relative(second)
    for path in relative(first):
        assert (first / path).read_bytes() == (second / path).read_bytes()


def test_write_siim_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        write_siim_dataset(tmp_path, n=0)
    with pytest.raises(ValueError, match="positive_fraction"):
        write_siim_dataset(tmp_path, n=2, positive_fraction=1.5)
