"""PNG previews of a stored image: with the outline of the worker's SEG drawn on it
(:func:`worker.preview.render_outline_png`), or the heat map secondary capture when the analysis
wrote one. Rendered on first request and cached under ``<storage_dir>/previews/`` (file names are
hashes: no UID on disk or in URLs)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from config.errors import PleuraError
from node.ledger import InstanceView, ResultView
from config.private_files import make_private, make_private_dirs
from node.storage import InstanceStore

PREVIEW_SIZE = 1024
HEATMAP_KINDS = ("SC", "HEATMAP")  # result kinds that may carry a Grad-CAM heat map
HEATMAP_MARK = "heat map"  # the SC writer names it in DerivationDescription when it burned one in
SYNTHETIC_CAPTION = "SYNTHETIC DEMO MODEL - not for clinical use"


class PreviewError(PleuraError, RuntimeError):
    """The stored image or result cannot be read or drawn."""


def seg_mask(seg: pydicom.Dataset, rows: int, columns: int) -> np.ndarray:
    """The union of the SEG's frames, as a boolean image the size of the source."""
    frames = np.asarray(seg.pixel_array)
    frame_rows, frame_columns = frames.shape[-2:]
    mask = frames.reshape(-1, frame_rows, frame_columns).any(axis=0)
    if mask.shape != (rows, columns):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((columns, rows), Image.NEAREST)) > 0
    return mask


class PreviewRenderer:
    def __init__(self, storage_dir: Path, size: int = PREVIEW_SIZE) -> None:
        self.store = InstanceStore(storage_dir)
        self.cache = storage_dir / "previews"
        self.size = size
        self._heatmaps: dict[str, bool] = {}

    def is_heatmap(self, result: ResultView) -> bool:
        """Whether a result shows a heat map: a secondary capture whose Derivation Description says
        a heat map is burned in (the SC without one shows only the outline)."""
        if result.kind not in HEATMAP_KINDS:
            return False
        known = self._heatmaps.get(result.sop_instance_uid)
        if known is None:
            try:
                header = pydicom.dcmread(self.store.path(result.storage_key), stop_before_pixels=True)
                known = HEATMAP_MARK in str(header.get("DerivationDescription", "")).lower()
            except (OSError, ValueError, pydicom.errors.InvalidDicomError):
                return False
            self._heatmaps[result.sop_instance_uid] = known
        return known

    def _cached(self, *parts: str) -> Path:
        name = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
        return self.cache / name[:2] / f"{name}.png"

    def _save(self, picture: Image.Image, target: Path) -> Path:
        make_private_dirs(target.parent)
        temp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        picture.save(temp, format="PNG")
        make_private(temp)  # a picture of the patient's image: config/private_files.py
        os.replace(temp, target)
        return target

    def outline(self, instance: InstanceView, seg: ResultView | None, *, synthetic: bool = False) -> Path:
        """The image with the SEG's outline in red (no SEG: the image alone)."""
        target = self._cached("outline", instance.sop_instance_uid, seg.sop_instance_uid if seg else "-", str(synthetic))
        if target.exists():
            return target
        try:
            source = pydicom.dcmread(self.store.path(instance.storage_key))
            if seg is not None:
                mask = seg_mask(pydicom.dcmread(self.store.path(seg.storage_key)), source.Rows, source.Columns)
            else:
                mask = np.zeros((source.Rows, source.Columns), dtype=bool)
            make_private_dirs(target.parent)
            temp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.png")
            _drawing().render_outline_png(source, mask, temp, max_size=self.size, caption=SYNTHETIC_CAPTION if synthetic else None)
            make_private(temp)
            os.replace(temp, target)
        except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
            raise PreviewError(f"cannot draw the preview: {type(exc).__name__}: {exc}") from exc
        return target

    def heatmap(self, result: ResultView) -> Path:
        """The heat map secondary capture as a PNG."""
        target = self._cached("heatmap", result.sop_instance_uid)
        if target.exists():
            return target
        try:
            dataset = pydicom.dcmread(self.store.path(result.storage_key))
            pixels = np.asarray(dataset.pixel_array)
            if pixels.ndim == 4 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
                pixels = pixels[0]  # the first frame
            if pixels.dtype != np.uint8:
                low, high = float(pixels.min()), float(pixels.max())
                pixels = ((pixels - low) / (high - low or 1.0) * 255).astype(np.uint8)
            picture = Image.fromarray(pixels)
            picture.thumbnail((self.size, self.size))
        except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
            raise PreviewError(f"cannot draw the heat map: {type(exc).__name__}: {exc}") from exc
        return self._save(picture.convert("RGB"), target)


def _drawing():  # noqa: ANN202  (the module worker.preview)
    """The decoder and the drawing live with the worker (torch): imported on first use only."""
    from worker import preview

    return preview


def viewer_image(dataset: pydicom.Dataset):  # noqa: ANN201  (worker.preview.ViewerImage)
    """The stored image for the page's viewer (:func:`worker.preview.viewer_image`)."""
    try:
        return _drawing().viewer_image(dataset)
    except (ValueError, AttributeError, TypeError) as exc:
        raise PreviewError(f"cannot decode the image for the viewer: {exc}") from exc


def overlay_png(mask: np.ndarray, colour: tuple[int, int, int], *, fill_alpha: int = 0, edge: int = 2) -> bytes:
    """A transparent PNG the size of the mask: its boundary in `colour` (and its inside with
    `fill_alpha`), for the viewer to lay over the image."""
    from io import BytesIO

    from scipy import ndimage

    mask = mask.astype(bool)
    border = mask & ~ndimage.binary_erosion(mask, iterations=max(1, edge))
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask] = (*colour, fill_alpha)
    rgba[border] = (*colour, 255)
    buffer = BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
