"""The decision rule: which pixels are the lesion, and when an image is flagged.

One rule for everyone who decides: the worker (:func:`worker.inference.predict.predict_images`),
evaluation and threshold tuning (``training/evaluate.py``, ``training/tune.py``), so the numbers
they report describe what the node decides. A bundle's ``thresholds`` are its parameters.
"""

from __future__ import annotations

import re

import numpy as np
from numpy.typing import ArrayLike

from contract.bundle import Manifest
from contract.preprocess import mask_to_source

__all__ = ["decision_reason", "flag_decision", "lesion_mask", "min_area_px", "reason_threshold", "source_lesion_mask"]


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


def _number(value: float, other: float) -> str:
    """``value`` with enough digits (3 to 6) to differ in print from ``other`` when they differ."""
    for digits in range(3, 7):
        if f"{value:.{digits}f}" != f"{other:.{digits}f}" or value == other:
            return f"{value:.{digits}f}"
    return repr(value)


def decision_reason(
    probability: float, area_px: int, probability_threshold: float, min_area_px: int, segmented: bool = True
) -> str:
    """The rule behind :func:`flag_decision`'s answer, in words for the report and the worklist:
    "classifier 0.999 >= 0.500, but segmented area 120 px < minimum 262 px". ``segmented`` False:
    a classifier-only bundle, whose rule is the threshold alone."""
    p, t = _number(probability, probability_threshold), _number(probability_threshold, probability)
    if not segmented:
        relation = "<" if probability < probability_threshold else ">="
        return f"classifier {p} {relation} threshold {t} (classifier only, no segmentation)"
    if probability < probability_threshold:
        return f"classifier {p} < threshold {t}"
    if area_px < min_area_px:
        return f"classifier {p} >= threshold {t}, but segmented area {area_px} px < minimum {min_area_px} px"
    return f"classifier {p} >= threshold {t} and segmented area {area_px} px >= minimum {min_area_px} px"


_THRESHOLD = re.compile(r"threshold (\d+(?:\.\d+)?)")


def reason_threshold(reason: str | None) -> float | None:
    """The classifier threshold named in a :func:`decision_reason` text (None when it names none)."""
    found = _THRESHOLD.search(reason or "")
    return float(found.group(1)) if found else None
