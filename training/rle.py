"""The run-length encoding of the SIIM-ACR Pneumothorax Segmentation data set (``train-rle.csv``).

The mask is flattened in column-major order (down the first column, then the next; i.e.
``mask.T.ravel()``) and written as pairs "offset length", where each offset counts the pixels from
the END of the previous run (from the first pixel for the first run). An empty mask is "-1".
"""

from __future__ import annotations

import numpy as np

__all__ = ["EMPTY_RLE", "rle_decode", "rle_encode"]

EMPTY_RLE = "-1"


def rle_encode(mask: np.ndarray) -> str:
    """SIIM-ACR relative RLE of a 2-D mask (Rows, Columns); nonzero pixels are inside."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {array.shape}")
    flat = (array.T.ravel() != 0).astype(np.int8)
    if not flat.any():
        return EMPTY_RLE
    edges = np.diff(np.concatenate(([0], flat, [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    lengths = ends - starts
    previous_ends = np.concatenate(([0], ends[:-1]))
    offsets = starts - previous_ends
    return " ".join(f"{offset} {length}" for offset, length in zip(offsets.tolist(), lengths.tolist()))


def rle_decode(rle: str, width: int, height: int) -> np.ndarray:
    """A boolean mask of shape (height, width) from a SIIM-ACR RLE string ("-1" or "" = empty)."""
    if width < 1 or height < 1:
        raise ValueError(f"rle_decode: invalid image size {width}x{height}")
    text = rle.strip()
    flat = np.zeros(width * height, dtype=bool)
    if text in (EMPTY_RLE, ""):
        return flat.reshape(width, height).T
    try:
        numbers = [int(token) for token in text.split()]
    except ValueError:
        raise ValueError(f"rle_decode: not a run-length encoding: {rle[:60]!r}") from None
    if len(numbers) % 2:
        raise ValueError(f"rle_decode: odd number of values ({len(numbers)}) in {rle[:60]!r}")
    position = 0
    for offset, length in zip(numbers[0::2], numbers[1::2]):
        if offset < 0 or length < 1:
            raise ValueError(f"rle_decode: negative offset or empty run ({offset} {length}) in {rle[:60]!r}")
        position += offset
        if position + length > flat.size:
            raise ValueError(
                f"rle_decode: run {offset} {length} ends at pixel {position + length}, beyond the "
                f"{width}x{height} image"
            )
        flat[position : position + length] = True
        position += length
    return flat.reshape(width, height).T
