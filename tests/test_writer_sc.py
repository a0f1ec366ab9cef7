"""The Secondary Capture writer: checked by dciodvfy and read back with pydicom.

Every SC is built once per module (the RG radiographs are large) for each source, for a positive
and an empty finding, with and without a heat map. The heat map here is a made-up blob: the
Grad-CAM itself is tested in test_heatmap.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_samples import (
    dciodvfy_errors,
    dciodvfy_warnings,
    pydicom_data_file,
    save_dataset,
    synthetic_radiograph,
)
from PIL import Image
from result_models import CLINICAL_MODEL, DEMO_MODEL
from skimage.segmentation import find_boundaries

from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph
from worker.inference.result import ImageFinding
from worker.writers.common import DEMO_LABEL, SERIES_NUMBERS, describe
from worker.writers.sc import MAX_SIDE, banner_lines, build_sc
from worker.writers.uids import instance_uid, series_uid

# The recipe the demo bundle decodes with (VOI from the image, MONOCHROME1 inverted, no CLAHE).
RECIPE = Preprocessing(input_size=128, channels=1, voi="dicom", invert_monochrome1=True, clahe=False)


def monochrome1(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` (a synthetic CR) stored inverted, as MONOCHROME1 (bright = low values)."""
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ds.Rows, ds.Columns)
    top = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = (top - pixels).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    return ds


def utf8_source() -> pydicom.Dataset:
    ds = synthetic_radiograph(patient_name="Müller-Łukasiewicz^Zoë=山田^太郎", imager_pixel_spacing=(0.2, 0.2))
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


SOURCES = {
    # real CR, MONOCHROME1, 1955 x 1841, ISO_IR 100, Pixel Spacing 0\0: downscaled with its banner
    "rg1-cr-mono1": lambda: pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm")),
    # real CR, MONOCHROME1, 1760 x 1760, no Specific Character Set, no spacing
    "rg3-cr-mono1": lambda: pydicom.dcmread(pydicom_data_file("RG3_UNCR.dcm")),
    "dx-mono2-imager-spacing": lambda: synthetic_radiograph(imager_pixel_spacing=(0.4, 0.3)),
    "dx-mono2-calibrated-spacing": lambda: synthetic_radiograph(
        rows=480, columns=400, imager_pixel_spacing=(0.4, 0.4), pixel_spacing=(0.35, 0.36)
    ),
    "dx-mono2-no-spacing": lambda: synthetic_radiograph(imager_pixel_spacing=None),
    "cr-mono1-no-spacing": lambda: monochrome1(synthetic_radiograph(modality="CR", imager_pixel_spacing=None)),
    # larger than MAX_SIDE in both directions, not square
    "cr-mono1-large": lambda: monochrome1(
        synthetic_radiograph(modality="CR", rows=2600, columns=2200, imager_pixel_spacing=(0.15, 0.15))
    ),
    "dx-utf8-name": utf8_source,
    "dx-latin1-name": lambda: synthetic_radiograph(patient_name="Ångström^Jöns Ærø"),
}
CASES = [(source, positive, heat) for source in SOURCES for positive in (True, False) for heat in (True, False)]
CASE_IDS = [f"{s}-{'positive' if p else 'empty'}-{'heat' if h else 'plain'}" for s, p, h in CASES]

RED_MIN, OTHER_MAX = 170, 90  # an outline pixel after JPEG: R above, G and B below


@dataclass
class Built:
    source: pydicom.Dataset
    image: np.ndarray
    finding: ImageFinding
    heatmap: np.ndarray | None
    sc: pydicom.Dataset
    path: Path


def make_finding(image: np.ndarray, positive: bool) -> ImageFinding:
    """A finding as the inference step would report it: an apical crescent on the right, or nothing."""
    rows, columns = image.shape
    y, x = np.mgrid[0:rows, 0:columns]
    crescent = ((y - rows * 0.25) / (rows * 0.12)) ** 2 + ((x - columns * 0.3) / (columns * 0.1)) ** 2 < 1
    mask = crescent if positive else np.zeros((rows, columns), dtype=bool)
    return ImageFinding(
        probability=0.91 if positive else 0.07,
        threshold=0.5,
        flagged=positive,
        mask=mask,
        area_px=int(mask.sum()),
        area_cm2=12.5 if positive else None,
        side="right" if positive else None,
        gap_px=40.0 if positive else None,
        gap_mm=16.0 if positive else None,
        hemithorax_fraction=0.18 if positive else None,
    )


def make_heatmap(image: np.ndarray) -> np.ndarray:
    rows, columns = image.shape
    y, x = np.mgrid[0:rows, 0:columns]
    blob = np.exp(-(((y - rows * 0.3) / (rows * 0.2)) ** 2 + ((x - columns * 0.35) / (columns * 0.15)) ** 2))
    return blob.astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool, bool], Built]:
    out = tmp_path_factory.mktemp("sc")
    results = {}
    for name, load in SOURCES.items():
        source = load()
        image = decode_radiograph(source, RECIPE)
        heatmap = make_heatmap(image)
        for positive in (True, False):
            finding = make_finding(image, positive)
            for heat in (True, False):
                sc = build_sc(source, image, finding, DEMO_MODEL, heatmap if heat else None)
                path = save_dataset(sc, out / f"{name}-{positive}-{heat}.dcm")
                results[(name, positive, heat)] = Built(source, image, finding, heatmap if heat else None, sc, path)
    return results


def read_back(item: Built) -> tuple[pydicom.Dataset, np.ndarray]:
    ds = pydicom.dcmread(item.path)
    return ds, ds.pixel_array


def geometry(item: Built, ds: pydicom.Dataset) -> tuple[float, int]:
    """The scale factor from the source grid to the SC and the number of banner rows at its top."""
    rows, columns = item.image.shape
    scale = int(ds.Columns) / columns
    image_rows = round(rows * scale)
    return scale, int(ds.Rows) - image_rows


def red(pixels: np.ndarray) -> np.ndarray:
    pixels = pixels.astype(np.int16)
    return (pixels[..., 0] >= RED_MIN) & (pixels[..., 1] <= OTHER_MAX) & (pixels[..., 2] <= OTHER_MAX)


# --- dciodvfy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sc_has_no_dciodvfy_errors(built, case) -> None:
    item = built[case]
    assert dciodvfy_errors(item.path) == []
    # The only warning allowed is one the source itself causes (RG1's retired PN form).
    assert [w for w in dciodvfy_warnings(item.path) if "ReferringPhysicianName" not in w] == []


# --- pixels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sc_decodes_to_a_capped_rgb_picture_of_the_source(built, case) -> None:
    item = built[case]
    ds, pixels = read_back(item)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert ds.SamplesPerPixel == 3 and ds.BitsAllocated == 8
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    assert pixels.shape == (ds.Rows, ds.Columns, 3) and pixels.dtype == np.uint8  # pydicom converts to RGB
    assert max(ds.Rows, ds.Columns) <= MAX_SIDE
    rows, columns = item.image.shape
    scale, banner = geometry(item, ds)
    if max(rows, columns) + banner <= MAX_SIDE:
        assert (ds.Rows - banner, ds.Columns) == (rows, columns)  # no need to shrink
    else:
        assert scale < 1 and max(ds.Rows, ds.Columns) >= 0.98 * MAX_SIDE  # shrunk, not much more
    assert ds.LossyImageCompression == "01"
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(ds.LossyImageCompressionRatio) > 1

    # Below the banner is the decoded radiograph (grey levels 0..1 -> 0..255), scaled.
    if item.heatmap is None and not item.finding.flagged:
        picture = pixels[banner:].astype(np.float32).mean(axis=2)
        expected = Image.fromarray(item.image, mode="F").resize((picture.shape[1], picture.shape[0]))
        difference = np.abs(picture - np.asarray(expected) * 255)
        assert np.median(difference) < 6


@pytest.mark.parametrize("case", [c for c in CASES if c[1]], ids=[i for c, i in zip(CASES, CASE_IDS) if c[1]])
def test_positive_finding_is_outlined_in_red(built, case) -> None:
    item = built[case]
    ds, pixels = read_back(item)
    scale, banner = geometry(item, ds)
    boundary_y, boundary_x = np.nonzero(find_boundaries(item.finding.mask, mode="inner"))
    pick = np.linspace(0, len(boundary_y) - 1, 200).astype(int)
    out_y = np.clip(np.round((boundary_y[pick] + 0.5) * scale - 0.5).astype(int), 0, ds.Rows - banner - 1) + banner
    out_x = np.clip(np.round((boundary_x[pick] + 0.5) * scale - 0.5).astype(int), 0, ds.Columns - 1)
    assert red(pixels)[out_y, out_x].mean() > 0.9
    # ... and only there: well inside and well outside the crescent there is no red.
    image_part = red(pixels[banner:])
    assert image_part.sum() < 0.2 * image_part.size
    rows, columns = item.image.shape
    centre = (round(rows * 0.25 * scale), round(columns * 0.3 * scale))
    assert not image_part[centre]
    assert not image_part[-5:, :].any()


@pytest.mark.parametrize("case", [c for c in CASES if not c[1]], ids=[i for c, i in zip(CASES, CASE_IDS) if not c[1]])
def test_empty_finding_has_no_outline(built, case) -> None:
    item = built[case]
    ds, pixels = read_back(item)
    _, banner = geometry(item, ds)
    assert red(pixels[banner:]).sum() == 0


@pytest.mark.parametrize("source", SOURCES)
def test_heat_map_tints_the_picture_and_plain_stays_grey(built, source) -> None:
    plain_ds, plain = read_back(built[(source, False, False)])
    heat_ds, heat = read_back(built[(source, False, True)])
    _, banner = geometry(built[(source, False, False)], plain_ds)
    colour = lambda p: np.ptp(p[banner:].astype(np.int16), axis=2)  # noqa: E731 - spread of R, G, B
    assert colour(plain).max() <= 12  # JPEG leaves grey nearly grey
    tinted = colour(heat)
    assert tinted.max() > 40
    # The blob is hot at the top left and cold at the bottom right.
    rows, columns = tinted.shape
    assert tinted[round(rows * 0.3), round(columns * 0.35)] > tinted[-10, -10] + 20


@pytest.mark.parametrize("source", SOURCES)
def test_banner_is_not_the_image(built, source) -> None:
    item = built[(source, True, False)]
    ds, pixels = read_back(item)
    _, banner = geometry(item, ds)
    assert banner >= 30
    band = pixels[:banner].astype(np.int16)
    dark = (band.max(axis=2) < 40).mean()
    assert dark > 0.7  # black background ...
    assert (band.max(axis=2) > 200).mean() > 0.01  # ... with text on it
    # The banner ends in a black margin; the radiograph starts right below it (see the test above
    # for the pixels of the image part).
    assert (band[-2:].max(axis=2) < 40).mean() > 0.98
    below = pixels[banner : banner + 20].astype(np.float32).mean(axis=2)
    expected = Image.fromarray(item.image, mode="F").resize((ds.Columns, ds.Rows - banner))
    assert np.median(np.abs(below - np.asarray(expected)[:20] * 255)) < 8


def test_demo_label_is_burned_in_for_demo_models_only(built, tmp_path) -> None:
    item = built[("dx-mono2-imager-spacing", True, False)]
    yellow = lambda p: ((p[..., 0] > 180) & (p[..., 1] > 130) & (p[..., 2] < 100)).sum()  # noqa: E731
    ds, demo = read_back(item)
    _, banner = geometry(item, ds)
    assert yellow(demo[:banner].astype(np.int16)) > 20
    assert DEMO_LABEL in banner_lines(item.finding, DEMO_MODEL)
    assert DEMO_LABEL in ds.SeriesDescription

    clinical = build_sc(item.source, item.image, item.finding, CLINICAL_MODEL)
    path = save_dataset(clinical, tmp_path / "clinical.dcm")
    assert dciodvfy_errors(path) == []
    pixels = pydicom.dcmread(path).pixel_array
    assert yellow(pixels[:banner].astype(np.int16)) == 0
    assert DEMO_LABEL not in banner_lines(item.finding, CLINICAL_MODEL)
    assert "SYNTHETIC" not in clinical.SeriesDescription
    assert clinical.SeriesDescription == describe("SC", CLINICAL_MODEL)


def test_banner_text() -> None:
    image = np.zeros((100, 80), dtype=np.float32)
    positive = make_finding(image, positive=True)
    lines = banner_lines(positive, CLINICAL_MODEL)
    assert lines[0] == "Pneumothorax suspected (right)"
    assert lines[1] == "Probability 0.91 (threshold 0.50), area 12.5 cm2, largest gap 16 mm, 18% of hemithorax"
    assert lines[2] == "Model pleura-cxr 2.3.1 - AI result - not a diagnosis"
    assert len(lines) == 3
    unknown = replace(positive, side=None, area_cm2=None, gap_mm=None, hemithorax_fraction=None)
    assert banner_lines(unknown, CLINICAL_MODEL)[:2] == ["Pneumothorax suspected", "Probability 0.91 (threshold 0.50)"]
    assumed = replace(positive, side="left", side_assumed=True)
    assert banner_lines(assumed, CLINICAL_MODEL)[0] == "Pneumothorax suspected (left, assumed)"
    negative = make_finding(image, positive=False)
    assert banner_lines(negative, DEMO_MODEL) == [
        "No pneumothorax suspected",
        "Probability 0.07 (threshold 0.50)",
        "Model pleura-demo 0.1.0-demo - AI result - not a diagnosis",
        DEMO_LABEL,
    ]


# --- header ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sc_belongs_to_the_source_study_and_patient(built, case) -> None:
    item = built[case]
    ds = pydicom.dcmread(item.path)
    source = item.source
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "StudyID"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert str(ds.PatientName) == str(source.PatientName)
    assert ds.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.Modality == "OT"
    assert ds.SeriesInstanceUID == series_uid(source.StudyInstanceUID, DEMO_MODEL, "SC")
    assert ds.SOPInstanceUID == instance_uid(source.SOPInstanceUID, DEMO_MODEL, "SC")
    assert ds.SeriesNumber == SERIES_NUMBERS["SC"]
    assert ds.Manufacturer == "Pleura"
    assert ds.ManufacturerModelName == "pleura-demo" and ds.SoftwareVersions == "0.1.0-demo"
    assert ds.SeriesDescription == describe("SC", DEMO_MODEL)
    assert ds.BurnedInAnnotation == "YES"
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert ds.PatientOrientation == source.PatientOrientation
    assert "PixelSpacing" not in ds and "ImagerPixelSpacing" not in ds
    reference = ds.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert "pleura-demo 0.1.0-demo" in ds.DerivationDescription


@pytest.mark.parametrize(
    "source, charset, name",
    [
        ("dx-utf8-name", "ISO_IR 192", "Müller-Łukasiewicz^Zoë=山田^太郎"),
        ("dx-latin1-name", "ISO_IR 100", "Ångström^Jöns Ærø"),
    ],
)
def test_sc_keeps_non_ascii_patient_names(built, source, charset, name) -> None:
    ds = pydicom.dcmread(built[(source, True, True)].path)
    assert ds.SpecificCharacterSet == charset
    assert str(ds.PatientName) == name


def test_sc_without_patient_orientation(tmp_path) -> None:
    source = synthetic_radiograph(rows=300, columns=256)
    del source.PatientOrientation
    image = decode_radiograph(source, RECIPE)
    sc = build_sc(source, image, make_finding(image, True), DEMO_MODEL)
    assert sc.PatientOrientation == ""
    assert dciodvfy_errors(save_dataset(sc, tmp_path / "sc.dcm")) == []


def test_same_inputs_give_the_same_uids_and_a_new_version_new_ones(built) -> None:
    item = built[("dx-mono2-no-spacing", True, False)]
    again = build_sc(item.source, item.image, item.finding, DEMO_MODEL)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (item.sc.SOPInstanceUID, item.sc.SeriesInstanceUID)
    newer = build_sc(item.source, item.image, item.finding, replace(DEMO_MODEL, version="0.2.0-demo"))
    assert newer.SOPInstanceUID != item.sc.SOPInstanceUID
    assert newer.SeriesInstanceUID != item.sc.SeriesInstanceUID


def test_building_does_not_change_the_source(built) -> None:
    source = built[("rg1-cr-mono1", True, True)].source
    assert "PixelData" in source
    assert [float(v) for v in source.PixelSpacing] == [0.0, 0.0]


def test_build_sc_refuses_what_it_cannot_picture() -> None:
    source = synthetic_radiograph(rows=64, columns=64)
    image = decode_radiograph(source, RECIPE)
    finding = make_finding(image, True)
    with pytest.raises(ValueError, match="image shape"):
        build_sc(source, image[:32], finding, DEMO_MODEL)
    with pytest.raises(ValueError, match="mask shape"):
        build_sc(source, image, replace(finding, mask=finding.mask[:, :32]), DEMO_MODEL)
    with pytest.raises(ValueError, match="heat map shape"):
        build_sc(source, image, finding, DEMO_MODEL, np.zeros((64, 63), dtype=np.float32))
    source.SOPClassUID = pydicom.uid.CTImageStorage
    with pytest.raises(ValueError, match="only CR and DX"):
        build_sc(source, image, finding, DEMO_MODEL)


def _whole_picture_outline(mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The outline drawn the plain way (the whole mask resized, its boundary found and widened),
    and the pixels near a tie (a resized value within rounding of the 0.5 threshold), where
    rounding in another resize may draw the line one pixel over."""
    from scipy import ndimage

    cover = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.BILINEAR))
    small = cover >= 0.5
    if not small.any():
        small = cover >= cover.max()
    radius = max(1, round(max(shape) / 700))
    outline = ndimage.binary_dilation(find_boundaries(small, mode="inner"), iterations=radius)
    ties = ndimage.binary_dilation(np.abs(cover - 0.5) < 1e-5, iterations=radius + 2)
    return outline, ties


@pytest.mark.parametrize("scale", [0.37, 0.5, 0.93, 1.0, 1.7])
def test_the_outline_drawn_around_the_mask_is_the_whole_pictures(scale) -> None:
    """The SC traces the outline on a crop around the mask (fast): it is the outline the whole
    mask gives, but where a resized value ties with the threshold."""
    from scipy import ndimage

    from worker.writers.sc import _outline

    rng = np.random.default_rng(11)
    for _ in range(25):
        rows, columns = (int(v) for v in rng.integers(40, 700, 2))
        mask = np.zeros((rows, columns), dtype=bool)
        top, left = int(rng.integers(0, rows)), int(rng.integers(0, columns))
        mask[top : top + int(rng.integers(1, rows)), left : left + int(rng.integers(1, columns))] = True
        mask = ndimage.binary_dilation(mask & (rng.random(mask.shape) > 0.3), iterations=2)
        shape = (max(1, round(rows * scale)), max(1, round(columns * scale)))
        outline, where = _outline(mask, shape)
        drawn = np.zeros(shape, dtype=bool)
        drawn[where] = outline
        expected, ties = _whole_picture_outline(mask, shape)
        assert expected.any()
        assert not ((drawn != expected) & ~ties).any()
