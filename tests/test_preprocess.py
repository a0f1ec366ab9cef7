"""The shared preprocessing: DICOM decoding (LUTs, MONOCHROME1), network input, and the way back."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_samples import pydicom_data_file as pydicom_data
from contract.bundle import Preprocessing
from contract.preprocess import ImageDecodeError, decode_radiograph, mask_to_source, to_network_input

torch.set_num_threads(min(2, torch.get_num_threads()))

RECIPE = Preprocessing(input_size=64)


def grayscale(pixels: np.ndarray, bits_stored: int = 12, photometric: str = "MONOCHROME2") -> Dataset:
    """A minimal single-frame grayscale dataset holding ``pixels`` (unsigned)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def ramp(rows: int = 16, columns: int = 256, top: int = 4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, columns).round().astype(np.uint16), (rows, 1))


def test_minmax_when_the_image_has_no_voi():
    pixels = ramp(top=3000) + 100
    image = decode_radiograph(grayscale(pixels), RECIPE)
    assert image.dtype == np.float32 and image.shape == pixels.shape
    assert image.min() == 0.0 and image.max() == 1.0
    np.testing.assert_allclose(image, (pixels - 100) / 3000.0, atol=1e-6)


def test_monochrome1_decodes_to_the_inverse_of_monochrome2():
    pixels = ramp()
    pixels[:, :10] = 0
    as_m2 = grayscale(pixels, photometric="MONOCHROME2")
    as_m1 = grayscale(pixels, photometric="MONOCHROME1")
    for ds in (as_m1, as_m2):
        ds.WindowCenter, ds.WindowWidth = 2000, 3000
    m2 = decode_radiograph(as_m2, RECIPE)
    m1 = decode_radiograph(as_m1, RECIPE)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == 1.0  # the lowest stored value is white (dense) in MONOCHROME1
    kept = decode_radiograph(as_m1, RECIPE.model_copy(update={"invert_monochrome1": False}))
    np.testing.assert_allclose(kept, m2, atol=1e-6)


def test_window_center_and_width_are_applied():
    pixels = ramp()
    ds = grayscale(pixels)
    ds.WindowCenter, ds.WindowWidth = 1000, 501
    image = decode_radiograph(ds, RECIPE)
    values = pixels[0].astype(np.float64)
    # PS3.3 C.11.2.1.2.1, LINEAR: scaled to the output range, here 0..1
    expected = np.clip((values - (1000 - 0.5)) / (501 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(image[0], expected, atol=1e-4)
    assert image[0, values < 700].max() == 0.0 and image[0, values > 1300].min() == 1.0
    # "minmax" ignores the window
    plain = decode_radiograph(ds, RECIPE.model_copy(update={"voi": "minmax"}))
    np.testing.assert_allclose(plain[0], values / 4095.0, atol=1e-6)


def test_window_applies_after_the_rescale():
    pixels = ramp(top=4095)
    ds = grayscale(pixels)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 401  # in rescaled units
    image = decode_radiograph(ds, RECIPE)
    rescaled = pixels[0].astype(np.float64) - 1024
    np.testing.assert_allclose(image[0], np.clip((rescaled - 39.5) / 400 + 0.5, 0, 1), atol=1e-4)


@pytest.mark.parametrize(
    ("function", "center", "width"),
    [("LINEAR", 1000, 501), ("LINEAR", 2047.5, 1), ("LINEAR", [800, 3000], [300, 10]), ("LINEAR_EXACT", 1000, 501),
     ("LINEAR_EXACT", 512.25, 0.5), ("SIGMOID", 1500, 900), (None, 2000, 4096)],
)
@pytest.mark.parametrize(("signed", "rescale"), [(False, None), (True, (2, -100)), (False, (0.37, 3.25))])
def test_windowing_matches_pydicoms_scaled_to_its_output_range(function, center, width, signed, rescale):
    """The decoder's own rescale and windowing (float32, one clipped linear map, for speed)
    against pydicom's apply_modality_lut and apply_windowing, scaled from the output range that
    PS3.3 C.11.2.1.2 gives it."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    pixels = np.random.default_rng(7).integers(0, 4096, size=(32, 64)).astype(np.uint16)
    ds = grayscale(pixels)
    low, high = (-2048, 2047) if signed else (0, 4095)
    if signed:
        ds.PixelRepresentation = 1
        ds.PixelData = (pixels.astype(np.int16) - 2048).tobytes()
    if rescale is not None:  # the output range follows the rescale
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        low, high = sorted((low * rescale[0] + rescale[1], high * rescale[0] + rescale[1]))
    ds.WindowCenter, ds.WindowWidth = center, width
    if function is not None:
        ds.VOILUTFunction = function
    image = decode_radiograph(ds, RECIPE)

    modality = apply_modality_lut(ds.pixel_array, ds)
    reference = apply_windowing(np.asarray(modality, dtype=np.float64), ds)
    np.testing.assert_allclose(image, (reference - low) / (high - low), atol=2e-6)


@pytest.mark.parametrize(("function", "width"), [("LINEAR", 0.5), ("LINEAR_EXACT", 0), ("SIGMOID", -3), ("CUBIC", 10)])
def test_an_impossible_window_is_a_decode_error(function, width):
    ds = grayscale(ramp())
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1000, width, function
    with pytest.raises(ImageDecodeError, match="VOI LUT|Window Width"):
        decode_radiograph(ds, RECIPE)


def test_voi_lut_sequence_is_applied_and_preferred_over_the_window():
    pixels = np.tile(np.arange(256, dtype=np.uint16), (4, 1))
    ds = grayscale(pixels, bits_stored=8)
    lut = (np.arange(256) ** 2 // 255).astype(np.uint16)  # a curve, not a line
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 10, 5  # would saturate almost everything if it were used
    image = decode_radiograph(ds, RECIPE)
    np.testing.assert_allclose(image[0], lut / 255.0, atol=1e-6)


def test_an_8_bit_voi_lut_with_more_than_256_entries_is_indexed_correctly():
    pixels = np.tile(np.array([0, 255, 256, 600, 1023], dtype=np.uint16), (4, 1))
    ds = grayscale(pixels, bits_stored=10)
    lut = (np.arange(1024) // 4).astype(np.uint16)  # 1024 inputs onto 0..255
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 8]
    item.LUTData = lut.tolist()
    ds.VOILUTSequence = [item]
    image = decode_radiograph(ds, RECIPE)
    np.testing.assert_allclose(image[0], np.array([0, 63, 64, 150, 255]) / 255.0, atol=1e-6)
    assert ds.VOILUTSequence[0].LUTDescriptor[2] == 8  # the source dataset is left as it was


def test_real_lossless_j2k_radiograph_decodes_like_the_uncompressed_one():
    plain = pydicom.dcmread(pydicom_data("RG1_UNCR.dcm"))
    j2k = pydicom.dcmread(pydicom_data("RG1_J2KR.dcm"))
    assert plain.PhotometricInterpretation == "MONOCHROME1"
    assert j2k.file_meta.TransferSyntaxUID != plain.file_meta.TransferSyntaxUID
    a = decode_radiograph(plain, RECIPE)
    b = decode_radiograph(j2k, RECIPE)
    assert a.shape == (plain.Rows, plain.Columns) == b.shape
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.05
    # Inverted: the lungs (middle third, either side of the spine) are darker than the spine.
    rows, cols = a.shape
    lungs = np.r_[a[rows // 3 : rows // 2, cols // 5 : cols // 3], a[rows // 3 : rows // 2, 2 * cols // 3 : 4 * cols // 5]]
    spine = a[rows // 3 : rows // 2, cols // 2 - 40 : cols // 2 + 40]
    assert lungs.mean() < spine.mean()


def test_unreadable_pixel_data_names_the_file(tmp_path):
    ds = grayscale(ramp())
    ds.PixelData = ds.PixelData[:100]  # truncated
    path = tmp_path / "truncated.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match="truncated.dcm"):
        decode_radiograph(pydicom.dcmread(path), RECIPE)
    colour = pydicom.dcmread(pydicom_data("SC_rgb.dcm"))
    with pytest.raises(ImageDecodeError, match="RGB"):
        decode_radiograph(colour, RECIPE)
    assert issubclass(ImageDecodeError, ValueError)


def test_clahe_keeps_the_unit_range_and_changes_contrast():
    pixels = (np.random.default_rng(0).random((64, 64)) * 4095).astype(np.uint16)
    image = decode_radiograph(grayscale(pixels), RECIPE.model_copy(update={"clahe": True}))
    assert image.shape == (64, 64) and 0.0 <= image.min() and image.max() <= 1.0
    plain = decode_radiograph(grayscale(pixels), RECIPE)
    assert not np.allclose(image, plain)


@pytest.mark.parametrize("channels", [1, 3])
def test_network_input_shape_and_range(channels):
    image = np.random.default_rng(1).random((300, 240)).astype(np.float32)
    recipe = Preprocessing(input_size=64, channels=channels)
    x = to_network_input(image, recipe)
    assert x.shape == (channels, 64, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert np.array_equal(x[0], x[-1])
    z = to_network_input(np.full((50, 50), 0.5, dtype=np.float32), recipe.model_copy(update={"normalisation": "zscore"}))
    np.testing.assert_allclose(z, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        to_network_input(np.zeros((2, 3, 4), dtype=np.float32), recipe)


def test_mask_to_source_inverts_the_resize():
    rows, columns = 300, 220  # not square, not a multiple of the input size
    yy, xx = np.mgrid[0:rows, 0:columns]
    blob = ((yy - 120) / 60.0) ** 2 + ((xx - 140) / 40.0) ** 2 <= 1.0
    network = to_network_input(blob.astype(np.float32), RECIPE)[0]
    back = mask_to_source(network, (rows, columns))
    assert back.shape == (rows, columns) and back.dtype == np.float32
    restored = back >= 0.5
    iou = (restored & blob).sum() / (restored | blob).sum()
    assert iou > 0.93
    # A smooth field survives the round trip closely.
    smooth = (np.sin(yy / 40.0) * np.cos(xx / 30.0) * 0.5 + 0.5).astype(np.float32)
    round_trip = mask_to_source(to_network_input(smooth, RECIPE)[0], (rows, columns))
    assert np.abs(round_trip - smooth)[10:-10, 10:-10].max() < 0.05
    with pytest.raises(ValueError, match="2-D"):
        mask_to_source(np.zeros((2, 8, 8)), (10, 10))
