"""A cached, resized copy of a data set's images (and masks), for fast epochs on small machines.

Each image is decoded once with the shared preprocessing (:func:`decode_radiograph` for DICOM,
:func:`decode_bitmap` for PNG, CLAHE included when the recipe asks for it), resized to the network's
input grid with :func:`resize_to_input`, and stored as float16 in a memory-mapped ``images.npy``;
masks (the OR of the image's RLE rows) go through the same resize and a 0.5 threshold into
``masks.npy``. Normalisation and channel repetition are left to training time, after augmentation.

The cache directory is named by a hash of the decoding recipe, the size and every image's path,
size, modification time and labels, so a changed file or recipe makes a new cache, and an
unchanged one is reused by the next run. It is written to a temporary folder and renamed, so an
interrupted build leaves no half cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from contract.bundle import Preprocessing
from contract.preprocess import ImageDecodeError, decode_bitmap, decode_radiograph, resize_to_input
from training.datasets import DatasetError, Example, Problem

__all__ = ["CachedImages", "build_cache", "decode_example", "default_cache_root"]

CACHE_FORMAT = 2
"""Part of every cache's fingerprint: raised when decoding changes what it makes of the same files
(2: the Presentation LUT Shape INVERSE and the Presentation LUT Sequence are applied), so a cache
made by an older version is built again rather than trained on."""


def default_cache_root() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("pleura")) / "datasets"


@dataclass
class CachedImages:
    """Resized images (N, S, S) float16 in [0, 1], masks (N, S, S) uint8 or None, labels (N,) bool."""

    directory: Path
    image_ids: list[str]
    images: np.ndarray
    masks: np.ndarray | None
    labels: np.ndarray
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)


def decode_example(example: Example, recipe: Preprocessing) -> np.ndarray:
    """The image of ``example`` decoded by the shared preprocessing: float32 (Rows, Columns) in [0, 1]."""
    if example.path.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(example.path) as picture:
            if picture.mode not in ("L", "I;16", "I;16B", "I"):
                picture = picture.convert("L")
            pixels = np.asarray(picture)
        if pixels.dtype == np.int32:  # mode "I" (16-bit PNG opened as 32-bit)
            pixels = np.clip(pixels, 0, 65535).astype(np.uint16)
        return decode_bitmap(pixels, recipe, str(example.path))
    return decode_radiograph(pydicom.dcmread(example.path), recipe)


def _fingerprint(examples: Sequence[Example], recipe: Preprocessing, with_masks: bool) -> str:
    digest = hashlib.sha256()
    decoding = recipe.model_dump(include={"input_size", "voi", "invert_monochrome1", "clahe", "clahe_clip_limit"})
    digest.update(json.dumps([CACHE_FORMAT, decoding, with_masks], sort_keys=True).encode())
    for example in examples:
        try:
            stat = example.path.stat()
            stamp = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = (-1, -1)
        digest.update(json.dumps([example.image_id, str(example.path), stamp, list(example.rles)]).encode())
    return digest.hexdigest()[:20]


def _load(directory: Path) -> CachedImages:
    meta = json.loads((directory / "meta.json").read_text())
    masks_file = directory / "masks.npy"
    return CachedImages(
        directory=directory,
        image_ids=list(meta["image_ids"]),
        images=np.load(directory / "images.npy", mmap_mode="r"),
        masks=np.load(masks_file, mmap_mode="r") if masks_file.exists() else None,
        labels=np.asarray(meta["labels"], dtype=bool),
        problems=[Problem(Path(p["file"]), p["row"], p["message"]) for p in meta["problems"]],
    )


def build_cache(
    examples: Sequence[Example],
    recipe: Preprocessing,
    *,
    with_masks: bool,
    cache_root: Path | None = None,
    skip_bad: bool = False,
    on_image: Callable[[int, int], None] | None = None,
) -> CachedImages:
    """The cached copy of ``examples`` at ``recipe.input_size``, built when it is not there yet.

    An image whose pixel data will not decode stops the build with a :class:`DatasetError` naming
    the file and its CSV row, or with ``skip_bad`` is left out and listed in ``problems``.
    ``on_image(done, total)`` reports progress while building.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    directory = root / _fingerprint(examples, recipe, with_masks)
    if (directory / "meta.json").is_file():
        return _load(directory)
    root.mkdir(parents=True, exist_ok=True)
    size = recipe.input_size
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        images = np.lib.format.open_memmap(
            work / "images.npy", mode="w+", dtype=np.float16, shape=(len(examples), size, size)
        )
        masks = (
            np.lib.format.open_memmap(work / "masks.npy", mode="w+", dtype=np.uint8, shape=(len(examples), size, size))
            if with_masks
            else None
        )
        kept: list[int] = []
        problems: list[Problem] = []
        for index, example in enumerate(examples):
            row = example.rows[0] if example.rows else None
            try:
                decoded = decode_example(example, recipe)
                if with_masks:
                    mask = example.mask()
                    if mask.shape != decoded.shape:
                        raise ImageDecodeError(f"pixel data is {decoded.shape}, the header says {mask.shape}")
            except (ImageDecodeError, OSError, ValueError, AttributeError) as exc:
                problem = Problem(example.path, row, f"cannot decode the image: {exc}")
                if not skip_bad:
                    raise DatasetError(f"{problem} (use --skip-bad to leave such images out and report them)") from None
                problems.append(problem)
            else:
                slot = len(kept)
                images[slot] = resize_to_input(decoded, recipe)
                if masks is not None:
                    masks[slot] = resize_to_input(mask.astype(np.float32), recipe) >= 0.5
                kept.append(index)
            if on_image is not None:
                on_image(index + 1, len(examples))
        images.flush()
        del images
        if masks is not None:
            masks.flush()
            del masks
        if len(kept) < len(examples):  # shrink to the kept images
            for name in ("images.npy", "masks.npy") if with_masks else ("images.npy",):
                full = np.load(work / name, mmap_mode="r")
                np.save(work / f"{name}.kept", np.ascontiguousarray(full[: len(kept)]))
                del full
                os.replace(work / f"{name}.kept.npy", work / name)
        meta = {
            "format": CACHE_FORMAT,
            "recipe": recipe.model_dump(mode="json"),
            "image_ids": [examples[i].image_id for i in kept],
            "labels": [bool(examples[i].positive) for i in kept],
            "problems": [{"file": str(p.file), "row": p.row, "message": p.message} for p in problems],
        }
        (work / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(work, directory)
        except OSError:  # another run built it meanwhile
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return _load(directory)
