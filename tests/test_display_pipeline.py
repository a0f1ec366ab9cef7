"""Every radiograph read as the radiologist's display shows it (PS3.4 grayscale pipeline).

The same picture stored every way a modality may store it — MONOCHROME2, MONOCHROME1, MONOCHROME2
with Presentation LUT Shape INVERSE, MONOCHROME1 with INVERSE (the DX convention), a Presentation
LUT Sequence — with no VOI, a window or a VOI LUT Sequence, as CR and DX, gives the same network
input; and the analysis takes the same decision on it, draws the same SC and gives the GSPS the
Presentation LUT the model's input went through; and the page's viewer gets the same picture and
window.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_samples import dciodvfy_errors
from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph, presentation_inverted, to_network_input
from training.synthetic import radiograph_dataset, synthetic_chest_image, synthetic_dicom
from worker.analysis import StudyAnalyser
from worker.preview import viewer_image

TOP = 4095  # 12 bits stored
RECIPE = Preprocessing(input_size=128)


def _picture(seed: int = 3, size: int = 192) -> np.ndarray:
    """What the display should show, as 12-bit values (bright = dense)."""
    pixels, _ = synthetic_chest_image(seed=seed, positive=True, size=size)
    return np.clip(np.rint(np.asarray(pixels, dtype=np.float64) / np.max(pixels) * TOP), 0, TOP).astype(np.uint16)


def _gamma_lut() -> np.ndarray:
    """A VOI LUT over the 12-bit range: a gamma curve from 0 to 65535."""
    ramp = np.arange(TOP + 1) / TOP
    return np.rint(ramp**0.7 * 65535).astype(np.uint16)


def _stored(picture: np.ndarray, storage: str, voi: str, modality: str) -> Dataset:
    """``picture`` stored as ``storage`` with the VOI ``voi``, as one display would show it."""
    inverted = storage != "MONOCHROME2"
    stored = (TOP - picture).astype(np.uint16) if inverted else picture
    ds = radiograph_dataset(
        stored, modality=modality, sop_instance_uid=pydicom.uid.generate_uid(),
        study_instance_uid="1.2.826.0.1.3680043.8.498.1", series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        patient_name="Display^Test", patient_id="DISPLAY", imager_pixel_spacing=(0.2, 0.2),
    )
    for keyword in ("WindowCenter", "WindowWidth", "PresentationLUTShape"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PhotometricInterpretation = "MONOCHROME1" if storage.startswith("MONOCHROME1") else "MONOCHROME2"
    if storage.endswith("+INVERSE"):
        ds.PresentationLUTShape = "INVERSE"
    elif storage == "MONOCHROME2+LUT":
        # A decreasing Presentation LUT: the display inverts through the LUT.
        item = Dataset()
        item.LUTDescriptor = [TOP + 1, 0, 12]
        item.LUTData = [int(v) for v in (TOP - np.arange(TOP + 1))]
        ds.PresentationLUTSequence = [item]
    elif modality == "DX":
        ds.PresentationLUTShape = "INVERSE" if inverted else "IDENTITY"
    if voi == "window":
        # LINEAR_EXACT: the window over mirrored values shows exactly the mirrored picture.
        center, width = 1500.0, 2400.0
        ds.WindowCenter, ds.WindowWidth = (TOP - center if inverted else center), width
        ds.VOILUTFunction = "LINEAR_EXACT"
    elif voi == "lut":
        lut = _gamma_lut()
        # After the inversion the display must show lut[picture]: lut'[s] = 65535 - lut[TOP - s].
        entries = (65535 - lut[::-1]) if inverted else lut
        item = Dataset()
        item.LUTDescriptor = [TOP + 1, 0, 16]
        item.LUTData = [int(v) for v in entries]
        ds.VOILUTSequence = [item]
    return ds


STORAGES = ("MONOCHROME2", "MONOCHROME1", "MONOCHROME2+INVERSE", "MONOCHROME1+INVERSE", "MONOCHROME2+LUT")


@pytest.mark.parametrize("modality", ["CR", "DX"])
@pytest.mark.parametrize("voi", ["none", "window", "lut"])
def test_the_network_input_is_the_same_for_one_picture_stored_every_way(modality, voi):
    picture = _picture()
    reference = to_network_input(decode_radiograph(_stored(picture, "MONOCHROME2", voi, modality), RECIPE), RECIPE)
    for storage in STORAGES[1:]:
        ds = _stored(picture, storage, voi, modality)
        assert presentation_inverted(ds) is True, storage
        shown = to_network_input(decode_radiograph(ds, RECIPE), RECIPE)
        # The Presentation LUT Sequence quantises to its 4096 entries; the others are exact.
        tolerance = 1.5 / TOP if storage.endswith("LUT") else 1e-5
        np.testing.assert_allclose(shown, reference, atol=tolerance, err_msg=f"{storage} with VOI {voi}")


def test_inverse_is_not_a_second_inversion_of_monochrome1():
    """DX stores MONOCHROME1 with Presentation LUT Shape INVERSE (PS3.3 C.8.11.1.1.1): one inversion."""
    picture = _picture()
    m1 = decode_radiograph(_stored(picture, "MONOCHROME1", "none", "CR"), RECIPE)
    m1_inverse = decode_radiograph(_stored(picture, "MONOCHROME1+INVERSE", "none", "CR"), RECIPE)
    np.testing.assert_allclose(m1, m1_inverse)
    assert np.corrcoef(m1.ravel(), picture.ravel())[0, 1] > 0.99


def test_monochrome2_inverse_is_inverted_and_identity_is_not():
    picture = _picture()
    plain = _stored(picture, "MONOCHROME2", "none", "DX")
    plain.PresentationLUTShape = "IDENTITY"
    inverse = copy.deepcopy(plain)
    inverse.PresentationLUTShape = "INVERSE"
    assert not presentation_inverted(plain)
    np.testing.assert_allclose(decode_radiograph(inverse, RECIPE), 1.0 - decode_radiograph(plain, RECIPE), atol=1e-6)


def test_a_broken_presentation_lut_is_a_decode_error_naming_it():
    ds = _stored(_picture(size=64), "MONOCHROME2+LUT", "none", "CR")
    ds.PresentationLUTSequence[0].LUTDescriptor = [4096, 0, 4]
    with pytest.raises(ValueError, match="Presentation LUT"):
        decode_radiograph(ds, RECIPE)


@pytest.fixture(scope="module")
def analyser(tmp_path_factory, demo_bundle):
    return StudyAnalyser.from_bundle_dir(tmp_path_factory.mktemp("display-storage"), demo_bundle, device="cpu")


def _decreasing_lut(bits: int) -> Dataset:
    """A Presentation LUT Sequence item that inverts: 2**bits entries from 2**bits - 1 down to 0."""
    top = (1 << bits) - 1
    item = Dataset()
    item.LUTDescriptor = [top + 1, 0, bits]
    item.LUTData = (top - np.arange(top + 1)).astype("<u2").tobytes()  # OW, as a file carries it
    return item


def _as(ds: Dataset, storage: str, sop_uid: str) -> Dataset:
    """The synthetic study image stored another way (same picture on the display)."""
    out = copy.deepcopy(ds)
    top = (1 << int(ds.BitsStored)) - 1
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if storage == "MONOCHROME2":
        return out
    out.PixelData = (top - ds.pixel_array).astype(np.uint16).tobytes()
    out.WindowCenter = top - float(ds.WindowCenter) + 1  # LINEAR's half-pixel offsets: c' = top - c + 1
    out.PhotometricInterpretation = "MONOCHROME1" if storage.startswith("MONOCHROME1") else "MONOCHROME2"
    if storage.endswith("+INVERSE"):
        out.PresentationLUTShape = "INVERSE"
    elif "PresentationLUTShape" in out:
        del out.PresentationLUTShape
    if storage == "MONOCHROME2+LUT":
        out.PresentationLUTSequence = [_decreasing_lut(int(ds.BitsStored))]
    return out


ANALYSED_STORAGES = ("MONOCHROME2", "MONOCHROME1", "MONOCHROME1+INVERSE", "MONOCHROME2+INVERSE", "MONOCHROME2+LUT")


def test_the_analysis_takes_the_same_decision_on_every_storage(analyser):
    """A MONOCHROME2 + INVERSE image used to be read with its contrast reversed (flagged falsely)."""
    source, _ = synthetic_dicom(seed=21, positive=False, size=512)
    findings, sc_pixels = {}, {}
    for index, storage in enumerate(ANALYSED_STORAGES):
        ds = _as(source, storage, pydicom.uid.generate_uid())
        key = f"instances/display/{index}.dcm"
        path = analyser.storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        summary = analyser.analyse(source.StudyInstanceUID, [{"sop_instance_uid": ds.SOPInstanceUID, "key": key}])
        [image] = summary["images"]
        assert image["status"] == "analysed", image
        findings[storage] = (image["flagged"], image["probability"], image["area_px"])
        by_kind = {result["kind"]: analyser.storage_dir / result["key"] for result in summary["results"]}
        gsps = pydicom.dcmread(by_kind["GSPS"])
        # The GSPS's Presentation LUT is the one the model's input went through.
        if storage == "MONOCHROME2+LUT":
            assert "PresentationLUTShape" not in gsps, storage
            [lut] = gsps.PresentationLUTSequence
            carried = np.frombuffer(lut.LUTData, dtype="<u2") if isinstance(lut.LUTData, bytes) else np.asarray(lut.LUTData)
            expected_lut = np.rint((4095 - np.arange(4096)) / 4095 * 65535)
            assert int(lut.LUTDescriptor[0]) == 4096 and int(lut.LUTDescriptor[2]) == 16
            # The same curve at 16 bits (float32 rounding: one step at most).
            np.testing.assert_allclose(carried.astype(np.float64), expected_lut, atol=1, rtol=0)
        else:
            expected = "IDENTITY" if storage == "MONOCHROME2" else "INVERSE"
            assert gsps.PresentationLUTShape == expected, storage
            assert "PresentationLUTSequence" not in gsps, storage
        assert dciodvfy_errors(by_kind["GSPS"]) == []
        sc_pixels[storage] = pydicom.dcmread(by_kind["SC"]).pixel_array.astype(np.int16)

    reference = findings["MONOCHROME2"]
    assert reference[0] is False  # a negative image stays negative
    for storage, found in findings.items():
        # The Presentation LUT Sequence quantises the VOI output to its 4096 entries.
        tolerance = 1e-3 if storage.endswith("LUT") else 1e-4
        assert found[0] == reference[0] and found[2] == reference[2], storage
        assert found[1] == pytest.approx(reference[1], abs=tolerance), storage
        # The SC shows the same picture (JPEG: a few grey levels apart at most).
        assert np.abs(sc_pixels[storage] - sc_pixels["MONOCHROME2"]).mean() < 1.0, storage


@pytest.mark.parametrize("voi", ["none", "window"])
def test_the_viewer_image_is_the_same_for_one_picture_stored_every_way(voi):
    """The page's viewer gets the picture as the display shows it, and the image's own window on
    that picture: MONOCHROME2 + INVERSE as MONOCHROME1 and as plain MONOCHROME2."""
    picture = _picture(size=96)
    reference = viewer_image(_stored(picture, "MONOCHROME2", voi, "CR"))
    shown_reference = np.frombuffer(reference.pixels, dtype="<u2").astype(np.float64)
    assert np.corrcoef(shown_reference, picture.ravel())[0, 1] > 0.99  # bright = dense, not reversed
    for storage in ("MONOCHROME1", "MONOCHROME2+INVERSE", "MONOCHROME1+INVERSE"):
        shown = viewer_image(_stored(picture, storage, voi, "CR"))
        assert (shown.rows, shown.columns) == (reference.rows, reference.columns)
        # 16-bit values of the same float picture, rounded: one step apart at most.
        np.testing.assert_allclose(
            np.frombuffer(shown.pixels, dtype="<u2").astype(np.int32),
            np.frombuffer(reference.pixels, dtype="<u2").astype(np.int32), atol=1, rtol=0, err_msg=storage,
        )
        assert shown.window_center == pytest.approx(reference.window_center, abs=1e-9), storage
        assert shown.window_width == pytest.approx(reference.window_width, abs=1e-9), storage
    if voi == "window":
        # The image's window (centre 1500 of the picture's values), not the default middle.
        assert reference.window_center != pytest.approx(0.5, abs=0.01)
