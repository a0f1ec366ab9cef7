"""The Secondary Capture (SC) result: the radiograph as a picture any PACS viewer can show.

SEG and SR need a viewer that understands them; many do not. The SC carries the same answer as
burned-in pixels, in the source's study and patient:

- the radiograph as decoded for the model (VOI-windowed, MONOCHROME1 inverted), RGB 8-bit,
  downscaled so that no side of the whole picture exceeds :data:`MAX_SIDE` (aspect kept);
- the optional Grad-CAM heat map, alpha-blended (more opaque where hotter);
- the pneumothorax outline in red when the image is flagged, drawn at the output resolution so it
  stays a few pixels wide whatever the scale;
- a black banner above the image with the finding, the probability, the model name and version,
  "AI result - not a diagnosis" and, for a synthetic demo model, :data:`DEMO_LABEL`.

Geometry. The SC is pixel-aligned with the source up to the scale factor and the banner offset, so
the source's Patient Orientation (row and column directions) holds for it too. No Pixel Spacing is
written: the picture is rescaled and has a banner, so nobody should measure on it (measurements
are in the SR).

Encoding. JPEG Baseline (lossy, YBR_FULL_422 as PS3.5 requires for it) keeps a 2048 px picture to
a few hundred kB instead of 12 MB; the Lossy Image Compression attributes say so.
"""

from __future__ import annotations

import numpy as np
import pydicom
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit
from pydicom.valuerep import DS
from scipy import ndimage
from skimage.segmentation import find_boundaries

from contract.bundle import ModelIdentity
from worker.inference.measure import bounding_box
from worker.inference.result import GRADCAM_REGION_LABEL, ImageFinding
from worker.writers.common import (
    AI_DISCLAIMER,
    DEMO_LABEL,
    carry_context,
    check_source,
    decision_text,
    describe,
    image_result_identity,
    source_header,
)

__all__ = ["MAX_SIDE", "banner_lines", "build_sc", "render_sc_pixels"]

MAX_SIDE = 2048
"""Largest Rows or Columns of the SC (banner included)."""

OUTLINE_RGB = (255, 0, 0)
HEAT_MAX_ALPHA = 0.45
"""Opacity of the heat map where it is hottest (1.0); it fades to transparent towards 0."""
# A hand-made colormap (five stops of viridis, interpolated linearly): it keeps matplotlib out of
# the worker's dependencies, and viridis has no red, so the outline stays the only red on the image.
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_COLOURS = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float32
)
_BANNER_BACKGROUND = (0, 0, 0)
_TEXT_RGB = (255, 255, 255)
_FLAGGED_RGB = (255, 96, 96)
_DEMO_RGB = (255, 210, 0)
_JPEG_METHOD = "ISO_10918_1"
# Patient Orientation values highdicom's constructor accepts (one biped direction per axis).
_BIPED = frozenset("APRLHF")


def build_sc(
    source: pydicom.Dataset,
    image: np.ndarray,
    finding: ImageFinding,
    model: ModelIdentity,
    heatmap: np.ndarray | None = None,
) -> SCImage:
    """A Secondary Capture of ``image`` (``decode_radiograph`` of ``source``) with the result burned in.

    ``heatmap`` (optional) is a 0..1 map on the same grid, e.g. from
    :func:`worker.inference.heatmap.gradcam_heatmap`. Raises ValueError when ``image``, the mask
    or the heat map does not match the source's Rows x Columns, or the source is not a
    single-frame CR or DX image.
    """
    check_source(source)
    shape = (int(source.Rows), int(source.Columns))
    _check_shape("image", image, shape)
    _check_shape("mask", finding.mask, shape)
    if heatmap is not None:
        _check_shape("heat map", heatmap, shape)

    pixels, banner_rows = _compose(image, finding, model, heatmap)
    header = source_header(source, keep_spacing=False)
    orientation = _source_orientation(source)
    sc = SCImage.from_ref_dataset(
        header,
        pixel_array=pixels,
        photometric_interpretation="YBR_FULL_422",
        bits_allocated=8,
        coordinate_system="PATIENT",
        **image_result_identity(source, model, "SC"),
        # highdicom wants a biped pair for a PATIENT image; the source's own value (compound,
        # e.g. "FL", or empty) replaces it below.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=JPEGBaseline8Bit,
        series_description=describe("SC", model),
    )
    carry_context(sc, source)  # character set, issuers, study description, as every result has
    # General Image: Patient Orientation is Type 2C (no Image Orientation on an SC); the picture
    # is the source's grid scaled, so its orientation is the source's (empty when unknown).
    sc.PatientOrientation = source.get("PatientOrientation") or ""
    # General Series: Laterality is Type 2C, required for paired body parts. Saying which body part
    # this is (only chest radiographs are analysed) tells a validator that none is needed.
    sc.BodyPartExamined = str(source.get("BodyPartExamined") or "").strip() or "CHEST"
    if source.get("Laterality") in ("R", "L"):
        sc.Laterality = source.Laterality
    sc.BurnedInAnnotation = "YES"
    burned_in = ["result banner"]
    if finding.flagged:
        burned_in.append(GRADCAM_REGION_LABEL if finding.is_gradcam_region else "pneumothorax outline")
    if heatmap is not None:
        burned_in.append("Grad-CAM heat map")
    sc.DerivationDescription = (
        f"{source.get('Modality') or 'Source'} image, VOI applied, shown at "
        f"{pixels.shape[1]} x {pixels.shape[0] - banner_rows} px of {shape[1]} x {shape[0]}, "
        f"with the {model.name} {model.version} result burned in ({', '.join(burned_in)})"
    )
    sc.SourceImageSequence = [_source_reference(source)]
    _set_lossy_compression(sc, source, pixels)
    return sc


def render_sc_pixels(
    image: np.ndarray,
    finding: ImageFinding,
    model: ModelIdentity,
    heatmap: np.ndarray | None = None,
) -> np.ndarray:
    """The SC's picture, uint8 (rows, columns, 3) RGB: the banner on top of the annotated image."""
    return _compose(image, finding, model, heatmap)[0]


def _compose(
    image: np.ndarray, finding: ImageFinding, model: ModelIdentity, heatmap: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """The picture and the number of banner rows at its top."""
    rows, columns = np.shape(image)
    scale = min(1.0, MAX_SIDE / max(rows, columns))
    for _ in range(4):  # the banner's height depends on the width: shrink until both fit
        out_rows, out_columns = max(1, round(rows * scale)), max(1, round(columns * scale))
        banner = _banner(finding, model, out_columns)
        if out_rows + banner.shape[0] <= MAX_SIDE:
            break
        scale = (MAX_SIDE - banner.shape[0]) / rows
    else:  # pragma: no cover - the banner is a small fraction of the width
        raise ValueError(f"cannot fit a {rows} x {columns} image and its banner into {MAX_SIDE} px")

    size = (out_columns, out_rows)  # Pillow's order
    # The picture is 8-bit, so the image is quantised first and resized as 8-bit grey: a quarter
    # of the data of a float resize, and the same picture to within a grey level.
    grey = np.empty(np.shape(image), dtype=np.float32)
    np.multiply(np.clip(image, 0.0, 1.0, dtype=np.float32), 255.0, out=grey)
    grey8 = np.rint(grey, out=grey).astype(np.uint8)
    if grey8.shape != (out_rows, out_columns):
        grey8 = np.asarray(Image.fromarray(grey8, mode="L").resize(size, Image.Resampling.LANCZOS))
    if heatmap is None:
        picture = np.repeat(grey8[..., None], 3, axis=2)
    else:
        heat = np.clip(_resize(heatmap, size, Image.Resampling.BILINEAR), 0.0, 1.0)
        alpha = (HEAT_MAX_ALPHA * heat)[..., None]
        rgb = (1.0 - alpha) * grey8[..., None].astype(np.float32) + alpha * _heat_colours(heat)
        picture = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    if finding.flagged:
        outline, where = _outline(np.asarray(finding.mask, dtype=bool), (out_rows, out_columns))
        picture[where][outline] = OUTLINE_RGB
    return np.concatenate([banner, picture], axis=0), banner.shape[0]


def banner_lines(finding: ImageFinding, model: ModelIdentity) -> list[str]:
    """The banner's text, one entry per line before wrapping."""
    headline = decision_text(finding)
    details = [f"Probability {finding.probability:.2f} (threshold {finding.threshold:.2f})"]
    if finding.flagged:
        if finding.area_cm2 is not None:
            details.append(f"area {finding.area_cm2:.1f} cm2")
        if finding.gap_mm is not None:
            details.append(f"largest gap {finding.gap_mm:.0f} mm")
        if finding.hemithorax_fraction is not None:
            details.append(f"{100 * finding.hemithorax_fraction:.0f}% of hemithorax")
    if finding.flagged and finding.is_gradcam_region:
        details.append(GRADCAM_REGION_LABEL)
    lines = [headline, ", ".join(details), f"Model {model.name} {model.version} - {AI_DISCLAIMER}"]
    if model.synthetic_demo:
        lines.append(DEMO_LABEL)
    return lines


# --- drawing -----------------------------------------------------------------------------------


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """``array`` (float, 2-D) resized to ``size`` (width, height), antialiased when shrinking."""
    data = np.ascontiguousarray(array, dtype=np.float32)
    if data.shape == (size[1], size[0]):
        return data
    return np.asarray(Image.fromarray(data, mode="F").resize(size, resample), dtype=np.float32)


def _heat_colours(heat: np.ndarray) -> np.ndarray:
    return np.stack([np.interp(heat, _HEAT_STOPS, _HEAT_COLOURS[:, c]) for c in range(3)], axis=-1)


def _outline(mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The mask's boundary on the output grid ``shape``, a few pixels wide (wider for bigger
    pictures), as (boundary, where): the boundary covers the region ``where`` of the picture.

    Only the region around the mask is resized and traced (a pneumothorax covers a small part of
    the image); the crop is taken on whole source pixels with a margin, so the outline is the one
    the whole mask would give."""
    if not mask.any():
        return np.zeros((0, 0), dtype=bool), (slice(0, 0), slice(0, 0))
    rows, columns = mask.shape
    scale_rows, scale_columns = shape[0] / rows, shape[1] / columns
    radius = max(1, round(max(shape) / 700))
    box = bounding_box(mask)
    # Margin, in source pixels: the bilinear kernel's reach and the dilation radius, both
    # measured on the output grid.
    margin = int(np.ceil((radius + 3) / min(scale_rows, scale_columns))) + 1
    top, bottom = max(0, box[0].start - margin), min(rows, box[0].stop + margin)
    left, right = max(0, box[1].start - margin), min(columns, box[1].stop + margin)
    # Output pixels whose centres fall inside the crop.
    out_top = 0 if top == 0 else int(np.ceil(top * scale_rows - 1e-6))
    out_bottom = shape[0] if bottom == rows else int(np.floor(bottom * scale_rows + 1e-6))
    out_left = 0 if left == 0 else int(np.ceil(left * scale_columns - 1e-6))
    out_right = shape[1] if right == columns else int(np.floor(right * scale_columns + 1e-6))
    if (out_top, out_bottom, out_left, out_right) == (0, shape[0], 0, shape[1]) or min(
        out_bottom - out_top, out_right - out_left
    ) < 1:
        cover = _resize(mask.astype(np.float32), (shape[1], shape[0]), Image.Resampling.BILINEAR)
        where = (slice(0, shape[0]), slice(0, shape[1]))
    else:
        crop = mask[top:bottom, left:right].astype(np.float32)
        # The crop's output pixels, resampled from the crop's own extent in source coordinates.
        box_in_crop = (
            out_left / scale_columns - left, out_top / scale_rows - top,
            out_right / scale_columns - left, out_bottom / scale_rows - top,
        )
        cover = np.asarray(
            Image.fromarray(crop, mode="F").resize(
                (out_right - out_left, out_bottom - out_top), Image.Resampling.BILINEAR, box=box_in_crop
            ),
            dtype=np.float32,
        )
        where = (slice(out_top, out_bottom), slice(out_left, out_right))
    small = cover >= 0.5
    if not small.any():  # smaller than an output pixel: keep a dot where it was
        small = cover >= cover.max()
    edge = find_boundaries(small, mode="inner")
    return ndimage.binary_dilation(edge, iterations=radius), where


_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _banner(finding: ImageFinding, model: ModelIdentity, width: int) -> np.ndarray:
    """The banner, uint8 (height, width, 3): wrapped text lines on black, sized to the width."""
    size = max(12, round(width / 42))
    font = _font(size)
    pad = max(3, size // 2)
    line_height = round(size * 1.3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[tuple[str, tuple[int, int, int]]] = []
    for index, text in enumerate(banner_lines(finding, model)):
        if index == 0:
            colour = _FLAGGED_RGB if finding.flagged else _TEXT_RGB
        elif model.synthetic_demo and text == DEMO_LABEL:
            colour = _DEMO_RGB
        else:
            colour = _TEXT_RGB
        for piece in _wrap(text, font, measure, width - 2 * pad):
            lines.append((piece, colour))
    height = 2 * pad + line_height * len(lines)
    banner = Image.new("RGB", (width, height), _BANNER_BACKGROUND)
    draw = ImageDraw.Draw(banner)
    for number, (text, colour) in enumerate(lines):
        draw.text((pad, pad + number * line_height), text, fill=colour, font=font)
    return np.asarray(banner, dtype=np.uint8)


def _wrap(text: str, font: _Font, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a longer word stays whole)."""
    if draw.textlength(text, font=font) <= width:
        return [text]
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


# --- header ------------------------------------------------------------------------------------


def _check_shape(what: str, array: np.ndarray, shape: tuple[int, int]) -> None:
    if np.shape(array) != shape:
        raise ValueError(f"{what} shape {np.shape(array)} does not match the source image {shape}")


def _source_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when highdicom can take it (two single biped letters)."""
    value = source.get("PatientOrientation")
    if not value:
        return None
    values = [str(v).strip().upper() for v in ([value] if isinstance(value, str) else value)]
    if len(values) == 2 and all(v in _BIPED for v in values):
        return values[0], values[1]
    return None


def _source_reference(source: pydicom.Dataset) -> Dataset:
    """A Source Image Sequence item: the radiograph this picture was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    purpose = Dataset()
    code = codes.DCM.SourceImageForImageProcessingOperation  # DCM 121322 (CID 7202)
    purpose.CodeValue = code.value
    purpose.CodingSchemeDesignator = code.scheme_designator
    purpose.CodeMeaning = code.meaning
    item.PurposeOfReferenceCodeSequence = [purpose]
    return item


def _set_lossy_compression(sc: SCImage, source: pydicom.Dataset, pixels: np.ndarray) -> None:
    """Lossy Image Compression (General Image): ours, after the source's own history if it has one."""
    encoded = next(generate_frames(sc.PixelData, number_of_frames=1))
    ratio = pixels.nbytes / max(1, len(encoded))
    ratios, methods = [], []
    if str(source.get("LossyImageCompression", "")) == "01":
        old_ratios = source.get("LossyImageCompressionRatio")
        old_methods = source.get("LossyImageCompressionMethod")
        if old_ratios is not None and old_methods is not None:
            ratios = [DS(v, auto_format=True) for v in np.atleast_1d(old_ratios)]
            methods = [str(v) for v in np.atleast_1d(old_methods)]
            if len(ratios) != len(methods):
                ratios, methods = [], []
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionRatio = [*ratios, DS(round(ratio, 2), auto_format=True)]
    sc.LossyImageCompressionMethod = [*methods, _JPEG_METHOD]
