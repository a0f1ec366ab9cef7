"""A PNG of a radiograph with the mask outline drawn on it, for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage

from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph


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
