"""The one preprocessing definition, used by training and by the worker alike.

A stored radiograph becomes the network's input in two steps:

1. :func:`decode_radiograph` turns the DICOM pixel data into a float image in [0, 1] on the source
   grid, as the radiologist's display shows it (bright = dense for a usual chest film): the grayscale
   pipeline of PS3.4 N.2 — Modality LUT, then VOI LUT or window, then the Presentation LUT (the
   image's Presentation LUT Sequence, or its Presentation LUT Shape INVERSE, or MONOCHROME1) —
   then optionally CLAHE.
2. :func:`to_network_input` resizes that image to the bundle's square input size, normalises it and
   repeats it to the network's channel count.

:func:`mask_to_source` maps a probability map from the network grid back to the source grid. The
whole image is resized to the square input (the aspect ratio is not preserved), so the inverse is a
plain resize back to (Rows, Columns) and every source pixel gets a probability.

Third-party classifiers bring their own recipe (``crop``, ``resize``, ``normalisation="range"``):
torchxrayvision's models take the centred square (``XRayCenterCrop``), scaled to [-1024, 1024]
(``normalize``) and then resized by scikit-image (``XRayResizer``). A bundle for such a model says
so in its manifest, and :func:`to_network_input` applies exactly those steps in that order, so the
worker feeds the network what it was trained on; :func:`input_to_source` maps a map on such a grid
(the Grad-CAM) back onto the source, zero outside the crop.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi

from config.errors import PleuraError
from contract.bundle import Preprocessing

__all__ = [
    "ImageDecodeError",
    "apply_clahe",
    "decode_bitmap",
    "crop_box",
    "decode_radiograph",
    "describe_source",
    "input_to_source",
    "mask_to_source",
    "resize_map",
    "network_inputs",
    "normalise_input",
    "presentation_inverted",
    "presentation_lut_entries",
    "resize_to_input",
    "to_network_input",
]


class ImageDecodeError(PleuraError, ValueError):
    """The pixel data of an image cannot be turned into a radiograph; the message names the file.

    :attr:`reason` is the same without the file: what the worker writes into the report and the
    worklist, which must never show a server path.
    """

    def __init__(self, reason: str, where: str | None = None, detail: str | None = None) -> None:
        text = f"{where}: {reason}" if where else reason
        super().__init__(f"{text}: {detail}" if detail else text)
        self.reason = reason


def _file_or_description(ds: pydicom.Dataset) -> str:
    """The dataset's file when it was read from one (for whoever runs training or checks on
    files), else :func:`describe_source`. :attr:`ImageDecodeError.reason` never holds either."""
    filename = getattr(ds, "filename", None)
    return filename if isinstance(filename, str) and filename else describe_source(ds)


def describe_source(ds: pydicom.Dataset) -> str:
    """A short name for a dataset in error messages that may reach a report or the worklist: its
    Instance and Series Numbers, never its file path or a UID (callers that know the file, such as
    training's data checks, name it themselves)."""
    instance, series = ds.get("InstanceNumber"), ds.get("SeriesNumber")
    name = f"instance {instance}" if instance not in (None, "") else "an image without Instance Number"
    return f"{name} of series {series}" if series not in (None, "") else name


def decode_radiograph(ds: pydicom.Dataset, recipe: Preprocessing) -> np.ndarray:
    """Decode a single-frame grayscale image to float32 in [0, 1], shape (Rows, Columns), bright = dense.

    With ``recipe.voi == "dicom"`` the image's own VOI LUT Sequence is applied if present, else its
    first Window Center/Width, else the image's min..max range; with ``"minmax"`` always the latter.
    """
    where = _file_or_description(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(
            f"PhotometricInterpretation {photometric or '(absent)'} is not a grayscale image "
            "(MONOCHROME1 or MONOCHROME2)",
            where,
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds: missing data, no decoder, truncated data
        raise ImageDecodeError(f"cannot decode the pixel data ({type(exc).__name__})", where, str(exc)) from exc
    if stored.ndim != 2:
        raise ImageDecodeError(
            f"pixel data has shape {stored.shape}; expected one frame of one sample (Rows, Columns)", where
        )

    try:
        image = _apply_voi(_modality_values(stored, ds), ds, recipe)
    except Exception as exc:
        raise ImageDecodeError(f"cannot apply the Modality/VOI LUT: {exc}", where) from exc

    if not np.all(np.isfinite(image)):
        raise ImageDecodeError("pixel values are not finite after the Modality/VOI LUT", where)
    if recipe.invert_monochrome1:
        try:
            image = _apply_presentation(image, ds)
        except Exception as exc:
            raise ImageDecodeError(f"cannot apply the Presentation LUT: {exc}", where) from exc
    image = image.astype(np.float32, copy=False)
    if recipe.clahe:
        image = _clahe(image, recipe.clahe_clip_limit)
    return image


def presentation_inverted(ds: pydicom.Dataset) -> bool:
    """Whether the display shows the lowest VOI output white: MONOCHROME1, or a Presentation LUT
    Shape of INVERSE (PS3.3 C.11.6). For a MONOCHROME1 image INVERSE says the same thing once
    (PS3.3 C.8.11.1.1.1 requires it of DX), so the two never cancel out.

    An image with a Presentation LUT Sequence is shown through that LUT instead
    (:func:`decode_radiograph`); this is then the direction of the LUT.
    """
    if ds.get("PresentationLUTSequence"):
        lut = presentation_lut_entries(ds)
        return bool(lut[-1] < lut[0])
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"


def presentation_lut_entries(ds: pydicom.Dataset) -> np.ndarray:
    """The entries of the image's Presentation LUT Sequence, scaled to [0, 1] by its bit depth."""
    item = ds.PresentationLUTSequence[0]
    entries, _, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 2**16
    if not 8 <= bits <= 16:
        raise ValueError(f"Presentation LUT Descriptor bit depth {bits} (expected 8 to 16)")
    raw = item.LUTData
    if isinstance(raw, bytes):  # OW: 16-bit words whatever the bit depth (PS3.3 C.11.4.1)
        values = np.frombuffer(raw, dtype="<u2")[:entries]
    else:
        values = np.atleast_1d(np.asarray(raw, dtype=np.float64))
    if len(values) < 2:
        raise ValueError("Presentation LUT Sequence holds fewer than two entries")
    return np.asarray(values, dtype=np.float32) / np.float32(2**bits - 1)


def _apply_presentation(image: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The Presentation LUT stage on a VOI output in [0, 1]: the image's Presentation LUT Sequence
    (VOI output spread over its entries, PS3.3 C.11.4), else an inversion when
    :func:`presentation_inverted`, else the identity. The result is what the display shows."""
    if ds.get("PresentationLUTSequence"):
        lut = presentation_lut_entries(ds)
        index = np.rint(image * np.float32(len(lut) - 1)).astype(np.intp)
        return np.clip(lut[index], 0.0, 1.0)
    if presentation_inverted(ds):
        return np.subtract(np.float32(1.0), image, dtype=np.float32)
    return image


def _modality_values(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The Modality LUT's output (PS3.3 C.11.1), float32.

    A Modality LUT Sequence goes through pydicom's ``apply_modality_lut``; the usual Rescale
    Slope/Intercept is applied here in float32 (float32 holds every 16-bit stored value exactly),
    because pydicom's float64 copy costs as much as the rest of the decoding at 2048 px.
    """
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if ds.get("ModalityLUTSequence") or slope is None or intercept is None:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    values = stored.astype(np.float32)
    if float(slope) != 1.0:
        values *= np.float32(float(slope))
    if float(intercept) != 0.0:
        values += np.float32(float(intercept))
    return values


def _apply_voi(modality: np.ndarray, ds: pydicom.Dataset, recipe: Preprocessing) -> np.ndarray:
    """VOI transformation scaled to [0, 1] by the transformation's own output range."""
    if recipe.voi == "dicom" and ds.get("VOILUTSequence"):
        # The LUT is indexed by the (integer) output of the Modality LUT.
        lut_input = np.rint(modality).astype(np.int64)
        voi = _wide_voi_lut(ds)
        values = np.asarray(apply_voi(lut_input, voi), dtype=np.float64)
        lo, hi = _voi_lut_range(voi)
        return _scale(values, lo, hi)
    if recipe.voi == "dicom" and ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        return _window(modality, ds)
    return _scale(modality, float(modality.min()), float(modality.max()))


def _first(value: Any) -> float:
    """The first value of a DS that may be multi-valued (the first window is the default one)."""
    return float(value[0]) if isinstance(value, (list, tuple, MultiValue)) else float(value)


def _window(modality: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The first Window Center/Width (PS3.3 C.11.2.1.2) on [0, 1], float32: pydicom's
    ``apply_windowing`` scaled from its output range, as one clipped linear map.

    Hand-written because pydicom's goes through float64 copies and boolean-mask assignments,
    several times slower at 2048 px (a third of the worker's time per image before the networks);
    ``tests/test_preprocess.py`` checks this against pydicom's for every VOI LUT Function.
    """
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    values = np.asarray(modality, dtype=np.float32)
    if function == "LINEAR":
        if width < 1:
            raise ValueError("the (0028,1051) Window Width must be at least 1 for a LINEAR window")
        center, width = center - 0.5, width - 1
        if width == 0:  # a step at the centre
            return (values > center).astype(np.float32)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("the (0028,1051) Window Width must be greater than 0 for a LINEAR_EXACT window")
    elif function == "SIGMOID":
        if width <= 0:
            raise ValueError("the (0028,1051) Window Width must be greater than 0 for a SIGMOID window")
        scaled = np.subtract(values, np.float32(center))
        scaled *= np.float32(-4.0 / width)
        np.exp(scaled, out=scaled)
        scaled += 1.0
        return np.reciprocal(scaled, out=scaled)
    else:
        raise ValueError(f"unsupported (0028,1056) VOI LUT Function {function!r}")
    return _scale(values, center - width / 2, center + width / 2)


def _wide_voi_lut(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset's VOI LUT, declared 16 bits per entry when it says 8.

    pydicom's apply_voi() indexes an 8-bit LUT with 8-bit indices, so inputs above 255 wrap round
    (a 1024-entry 8-bit LUT maps 256 to entry 0). The entries are the same values either way.
    """
    item = ds.VOILUTSequence[0]
    if int(item.LUTDescriptor[2]) != 8:
        return ds
    wide = pydicom.Dataset()
    wide.VOILUTSequence = copy.deepcopy(ds.VOILUTSequence)
    descriptor = list(wide.VOILUTSequence[0].LUTDescriptor)
    wide.VOILUTSequence[0].LUTDescriptor = [descriptor[0], descriptor[1], 16]
    if hasattr(ds, "file_meta"):
        wide.file_meta = ds.file_meta
    wide.set_original_encoding(*ds.original_encoding, character_encoding=ds.original_character_set)
    return wide


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` from [lo, hi] to [0, 1], float32 (the decoded image's type), in one buffer."""
    if hi <= lo:  # a constant image or a degenerate LUT: nothing to show
        return np.zeros(values.shape, dtype=np.float32)
    scaled = np.subtract(values, lo, dtype=np.float32)
    scaled *= np.float32(1.0 / (hi - lo))
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def _voi_lut_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Lowest and highest entry of the first VOI LUT.

    Used instead of the descriptor's nominal bit depth, which writers often get wrong (12-bit data
    in a LUT declared 16-bit).
    """
    item = ds.VOILUTSequence[0]
    entries, first_mapped = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    ramp = np.arange(first_mapped, first_mapped + entries, dtype=np.int64)
    lut = np.asarray(apply_voi(ramp, ds), dtype=np.float64)
    return float(lut.min()), float(lut.max())


def apply_clahe(image: np.ndarray, clip_limit: float) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image) of a [0, 1] image: the recipe's
    last decoding step, so ``decode(recipe without CLAHE)`` then this equals ``decode(recipe with CLAHE)``."""
    from skimage.exposure import equalize_adapthist  # imported here: only CLAHE recipes need it

    return np.asarray(equalize_adapthist(image, clip_limit=clip_limit), dtype=np.float32)


_clahe = apply_clahe


def resize_map(array: np.ndarray, shape: tuple[int, int], *, antialias: bool) -> np.ndarray:
    """A 2-D float map resized to ``shape`` (bilinear; ``antialias`` when shrinking), float32."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=antialias)
    return resized[0, 0].numpy()


def to_network_input(image: np.ndarray, recipe: Preprocessing) -> np.ndarray:
    """The network input (channels, size, size), float32, from a :func:`decode_radiograph` image.

    By default the full image is resized to the square input (bilinear, antialiased); the aspect
    ratio is not kept, which chest radiographs (near square) tolerate and which keeps the inverse
    mapping trivial. The same as :func:`resize_to_input` then :func:`normalise_input` (training
    augments between them). A ``resize="skimage"`` recipe normalises first and then resizes, as
    torchxrayvision does: its resize pads with zeros in the normalised scale, so the order matters.
    """
    if recipe.resize == "skimage":
        return _skimage_network_input(image, recipe)
    return normalise_input(resize_to_input(image, recipe), recipe)


def crop_box(shape: tuple[int, int], recipe: Preprocessing) -> tuple[slice, slice]:
    """The part of a (Rows, Columns) image the recipe resizes: all of it, or with
    ``crop="centre_square"`` the centred square of the shorter side, placed as torchxrayvision's
    ``XRayCenterCrop`` places it."""
    rows, columns = int(shape[0]), int(shape[1])
    if recipe.crop == "none":
        return slice(0, rows), slice(0, columns)
    side = min(rows, columns)
    top, left = rows // 2 - side // 2, columns // 2 - side // 2
    return slice(top, top + side), slice(left, left + side)


def _skimage_network_input(image: np.ndarray, recipe: Preprocessing) -> np.ndarray:
    from skimage.transform import resize  # imported here: only third-party recipes need it

    if np.ndim(image) != 2:
        raise ValueError(f"to_network_input expects a 2-D image (Rows, Columns), got shape {np.shape(image)}")
    values = _normalise_array(np.asarray(image, dtype=np.float32), recipe)
    cropped = values[crop_box(values.shape, recipe)][None]
    size = recipe.input_size
    resized = resize(cropped, (1, size, size), mode="constant", preserve_range=True).astype(np.float32)
    return np.repeat(resized, recipe.channels, axis=0).astype(np.float32, copy=False)


def resize_to_input(image: np.ndarray, recipe: Preprocessing) -> np.ndarray:
    """The decoded image (its :func:`crop_box`) resized to the recipe's square input, float32
    (size, size), still in [0, 1]."""
    if np.ndim(image) != 2:
        raise ValueError(f"to_network_input expects a 2-D image (Rows, Columns), got shape {np.shape(image)}")
    if recipe.resize != "bilinear":
        raise ValueError(f"resize {recipe.resize!r} normalises before resizing: use to_network_input")
    size = recipe.input_size
    return resize_map(np.asarray(image)[crop_box(np.shape(image), recipe)], (size, size), antialias=True)


def _normalise_array(values: np.ndarray, recipe: Preprocessing) -> np.ndarray:
    if recipe.normalisation == "zscore":
        return (values - recipe.mean) / recipe.std
    if recipe.normalisation == "range":
        low, high = recipe.value_range
        # Written as torchxrayvision's normalize(img, 1): (2 * img - 1) * 1024 for (-1024, 1024),
        # so the float32 roundings are the same too.
        return (2 * values - 1.0) * np.float32((high - low) / 2) + np.float32((high + low) / 2)
    return values


def normalise_input(resized: np.ndarray | torch.Tensor, recipe: Preprocessing):
    """Normalise a resized image (size, size) and repeat it to the recipe's channels: (channels, size, size).

    Takes a NumPy array (returns float32 NumPy) or a tensor of shape (size, size) or (N, 1, size, size)
    (returns a tensor, (N, channels, size, size) for a batch), so the training loop normalises its
    augmented batches with this same definition.
    """
    if isinstance(resized, torch.Tensor):
        values = resized.float()
        if recipe.normalisation == "zscore":
            values = (values - recipe.mean) / recipe.std
        elif recipe.normalisation == "range":
            low, high = recipe.value_range
            values = (2 * values - 1.0) * ((high - low) / 2) + (high + low) / 2
        if values.ndim == 2:
            return values[None].repeat(recipe.channels, 1, 1)
        return values.repeat(1, recipe.channels, 1, 1) if values.shape[1] == 1 else values
    values = _normalise_array(np.asarray(resized, dtype=np.float32), recipe)
    return np.repeat(values[None], recipe.channels, axis=0).astype(np.float32, copy=False)


def network_inputs(images: Sequence[np.ndarray], decoded_with: Preprocessing, recipe: Preprocessing) -> np.ndarray:
    """A batch (N, C, S, S) for a network with ``recipe`` from images decoded with ``decoded_with``
    (the bundle's shared recipe, :attr:`Manifest.preprocessing`). A network that alone uses CLAHE gets
    it applied here: CLAHE is decoding's last step, so the result equals decoding with ``recipe``."""
    own_clahe = recipe.clahe and not decoded_with.clahe
    return np.stack(
        [
            to_network_input(apply_clahe(image, recipe.clahe_clip_limit) if own_clahe else image, recipe)
            for image in images
        ]
    )


def decode_bitmap(pixels: np.ndarray, recipe: Preprocessing, where: str = "image") -> np.ndarray:
    """A grayscale bitmap (a PNG's 8- or 16-bit values, e.g. ChestX-ray14) as :func:`decode_radiograph`
    gives a DICOM image: float32 in [0, 1] by the bit depth's full range, bright = dense, then CLAHE
    when the recipe asks for it."""
    array = np.asarray(pixels)
    if array.ndim == 3:  # RGB(A) saved grayscale: take the first channel
        array = array[..., 0]
    if array.ndim != 2 or array.dtype.kind not in "ui":
        raise ImageDecodeError(f"expected a grayscale 8- or 16-bit image, got {array.dtype} {array.shape}", where)
    top = 255.0 if array.dtype.itemsize == 1 else 65535.0
    image = np.clip(array.astype(np.float32) / top, 0.0, 1.0)
    if recipe.clahe:
        image = _clahe(image, recipe.clahe_clip_limit)
    return image


def mask_to_source(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a probability map (H, W) from the network grid to the source grid ``shape`` (bilinear).

    The inverse of :func:`to_network_input`'s resize; the caller thresholds the result.
    """
    array: Any = np.asarray(prob)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"mask_to_source expects a 2-D probability map, got shape {np.shape(prob)}")
    rows, columns = int(shape[0]), int(shape[1])
    if rows < 1 or columns < 1:
        raise ValueError(f"mask_to_source: invalid source shape {shape}")
    if array.shape == (rows, columns):
        return array.astype(np.float32, copy=True)
    # Enlarging needs no antialiasing; shrinking (a source smaller than the input) does.
    shrinking = rows < array.shape[0] or columns < array.shape[1]
    return resize_map(array, (rows, columns), antialias=shrinking)


def input_to_source(prob: np.ndarray, shape: tuple[int, int], recipe: Preprocessing) -> np.ndarray:
    """A map on the network grid of ``recipe`` (e.g. a Grad-CAM) on the source grid ``shape``:
    :func:`mask_to_source` onto the recipe's :func:`crop_box`, zero outside it."""
    rows, columns = crop_box(shape, recipe)
    if recipe.crop == "none":
        return mask_to_source(prob, shape)
    out = np.zeros((int(shape[0]), int(shape[1])), dtype=np.float32)
    out[rows, columns] = mask_to_source(prob, (rows.stop - rows.start, columns.stop - columns.start))
    return out
