"""The decision rule: which pixels are the lesion, and when an image is flagged.

One rule for everyone who decides: the worker (:func:`worker.inference.predict.predict_images`),
evaluation and threshold tuning (``training/evaluate.py``, ``training/tune.py``), so the numbers
they report describe what the node decides. A bundle's ``thresholds`` are its parameters. The
rule in words, for the report and the worklist, is in :mod:`contract.reasons`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from contract.bundle import Manifest
from contract.preprocess import mask_to_source

__all__ = ["flag_decision", "lesion_mask", "min_area_px", "source_lesion_mask"]


def lesion_mask(source_probabilities: np.ndarray, mask_threshold: float) -> np.ndarray:
    """The U-Net's mask on the source grid: pixels whose probability reaches the mask threshold."""
    return np.asarray(source_probabilities) >= mask_threshold


def source_lesion_mask(network_map: np.ndarray, shape: tuple[int, int], mask_threshold: float) -> np.ndarray:
    """``lesion_mask(mask_to_source(network_map, shape), mask_threshold)``, without resizing a map
    none of whose pixels comes near the threshold (most images): bilinear resizing, antialiased or
    not, takes means with non-negative weights, so no source pixel can reach it either. The margin
    covers float32 rounding in those means."""
    if float(np.max(network_map)) < mask_threshold - 1e-5:
        return np.zeros((int(shape[0]), int(shape[1])), dtype=bool)
    return lesion_mask(mask_to_source(network_map, shape), mask_threshold)


def flag_decision(
    probability: ArrayLike, area_px: ArrayLike, probability_threshold: ArrayLike, min_area_px: ArrayLike
) -> np.ndarray:
    """The node's decision: the classifier probability reaches its threshold and the mask covers at
    least ``min_area_px`` source pixels. Takes numbers or NumPy arrays (broadcast), so threshold
    tuning sweeps the very rule the worker applies."""
    return np.logical_and(np.asarray(probability) >= probability_threshold, np.asarray(area_px) >= min_area_px)


def min_area_px(manifest: Manifest) -> int:
    """The minimum mask area the rule applies for ``manifest``: its threshold, or 0 for a
    classifier-only bundle, which has no mask (its decision is the classifier's alone)."""
    return 0 if manifest.classifier_only else manifest.thresholds.min_area_px
