"""A PNG of a radiograph with the mask outline drawn on it, for people to look at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph, presentation_inverted


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The mask's boundary, `width` pixels thick, inside the mask."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width)


def render_outline_png(
    source: pydicom.Dataset, mask: np.ndarray, target: Path, max_size: int = 1024, caption: str | None = None
) -> Path:
    image = decode_radiograph(source, Preprocessing())
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    width = max(2, round(max(mask.shape) / 400))
    edge = outline(mask, width)
    rgb[edge] = (255, 40, 40)
    picture = Image.fromarray(rgb)
    picture.thumbnail((max_size, max_size))
    if caption:
        from PIL import ImageDraw

        draw = ImageDraw.Draw(picture)
        draw.rectangle((0, 0, picture.width, 18), fill=(0, 0, 0))
        draw.text((4, 3), caption, fill=(255, 255, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target)
    return target


@dataclass(frozen=True)
class ViewerImage:
    """An image for the page's viewer: every pixel at full resolution as 16-bit values on [0, 65535]
    (the Modality LUT's range, bright = dense), and the image's own window on that scale (0..1)."""

    rows: int
    columns: int
    pixels: bytes  # little-endian uint16, row by row
    window_center: float
    window_width: float


def _first(value: object) -> float:
    return float(value[0]) if isinstance(value, (list, tuple, MultiValue)) else float(value)  # type: ignore[index,arg-type]


def viewer_image(dataset: pydicom.Dataset) -> ViewerImage:
    """The image as :class:`ViewerImage`: the page windows it itself (presets, dragging), so it
    gets the whole range rather than the 8 bits of a preview."""
    image = decode_radiograph(dataset, Preprocessing(voi="minmax", invert_monochrome1=True, clahe=False))
    center, width = 0.5, 1.0
    wc, ww = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if wc not in (None, "") and ww not in (None, ""):
        modality = np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float64)
        low, high = float(modality.min()), float(modality.max())
        span = (high - low) or 1.0
        center, width = (_first(wc) - low) / span, max(_first(ww) / span, 1e-3)
        if presentation_inverted(dataset):
            center = 1.0 - center
    values = np.rint(np.clip(image, 0, 1) * 65535).astype("<u2")
    return ViewerImage(int(values.shape[0]), int(values.shape[1]), values.tobytes(), center, width)
