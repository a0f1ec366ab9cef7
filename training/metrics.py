"""The metrics the training loop and the evaluation share: classification at a threshold, the
SIIM-ACR leaderboard Dice (masks on a 1024x1024 grid), the bootstrap confidence interval of the
ROC AUC."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix

__all__ = [
    "AUC_CI_METHOD",
    "LEADERBOARD_METHOD",
    "LEADERBOARD_SIZE",
    "auc_confidence_interval",
    "binary_metrics",
    "classifier_metrics",
    "dice_from_counts",
    "leaderboard_dice",
    "resize_nearest",
]

LEADERBOARD_SIZE = 1024
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
AUC_CI_METHOD = (
    f"95% confidence interval of the ROC AUC: stratified bootstrap (positives and negatives resampled "
    f"separately, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}), 2.5th and 97.5th percentiles"
)

LEADERBOARD_METHOD = (
    "SIIM-ACR leaderboard metric: predicted and true masks resized to 1024x1024 by nearest neighbour, "
    "per-image Dice 2|P∩T|/(|P|+|T|), 1 when both are empty, mean over all images; the prediction is the "
    "node's decision (the U-Net mask when flagged, empty otherwise)"
)


def classifier_metrics(probabilities: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and specificity at ``threshold`` (MONAI's confusion-matrix
    metrics), and the ROC AUC when both classes are present; a ratio that is undefined is left out.
    Training's validation and ``pleura evaluate`` share these definitions."""
    predicted = (probabilities >= threshold).float()
    matrix = get_confusion_matrix(predicted[:, None], labels[:, None].float()).sum(dim=0)
    metrics = {
        name.replace(" ", "_"): float(compute_confusion_matrix_metric(name, matrix).item())
        for name in ("accuracy", "precision", "recall", "f1 score", "specificity")
    }
    metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}  # e.g. no positive predicted
    if labels.min() != labels.max():
        metrics["auc"] = float(compute_roc_auc(probabilities, labels))
    return metrics


def nearest_source_index(source: int, size: int = LEADERBOARD_SIZE) -> np.ndarray:
    """For each of ``size`` output pixels, the source pixel nearest-neighbour resizing takes it from
    (pixel centres aligned, as PIL's NEAREST)."""
    return np.minimum(((np.arange(size) + 0.5) * source / size).astype(np.int64), source - 1)


def resize_nearest(mask: np.ndarray, size: int = LEADERBOARD_SIZE) -> np.ndarray:
    """A 2-D mask resized to ``size`` x ``size`` by nearest neighbour."""
    rows, columns = np.shape(mask)
    return np.asarray(mask)[np.ix_(nearest_source_index(rows, size), nearest_source_index(columns, size))]


def leaderboard_weights(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """How many 1024-grid rows and columns each source row and column becomes under
    :func:`resize_nearest`: a mask's pixel count on that grid is ``rows @ mask @ columns``.

    Counting this way is exact (nearest neighbour copies whole source pixels) and needs no
    1024x1024 array per mask threshold.
    """
    rows, columns = shape
    return (
        np.bincount(nearest_source_index(rows), minlength=rows).astype(np.float64),
        np.bincount(nearest_source_index(columns), minlength=columns).astype(np.float64),
    )


def dice_from_counts(intersection: Any, predicted: Any, truth: Any) -> np.ndarray:
    """Per-image Dice from pixel counts (arrays broadcast): 2I/(P+T), 1 when both masks are empty."""
    intersection, predicted, truth = (np.asarray(v, dtype=np.float64) for v in (intersection, predicted, truth))
    total = predicted + truth
    return np.where(total > 0, 2.0 * intersection / np.where(total > 0, total, 1.0), 1.0)


def leaderboard_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """One image's SIIM-ACR Dice: both masks resized to 1024x1024 by nearest neighbour."""
    p, t = resize_nearest(np.asarray(predicted, bool)), resize_nearest(np.asarray(truth, bool))
    return float(dice_from_counts((p & t).sum(), p.sum(), t.sum()))


def auc_confidence_interval(
    labels: np.ndarray, scores: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """95% CI of the ROC AUC by stratified bootstrap (see :data:`AUC_CI_METHOD`); None with one class.

    Each resample's AUC is the Mann-Whitney statistic from average ranks (what ``roc_auc_score``
    computes), vectorised over blocks of resamples: calling scikit-learn 2000 times takes seconds.
    """
    from scipy.stats import rankdata

    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    n_pos, n_neg = len(positives), len(negatives)
    if not n_pos or not n_neg:
        return None
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, resamples, 250):
        block = min(250, resamples - start)
        drawn = np.concatenate(
            [rng.choice(positives, (block, n_pos)), rng.choice(negatives, (block, n_neg))], axis=1
        )
        ranks = rankdata(scores[drawn], axis=1)
        aucs.append((ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    low, high = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    return float(low), float(high)


def confusion(predicted: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    return {
        "tp": int((predicted & labels).sum()),
        "fp": int((predicted & ~labels).sum()),
        "tn": int((~predicted & ~labels).sum()),
        "fn": int((~predicted & labels).sum()),
    }


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, precision, recall (sensitivity), specificity, F1 at ``threshold`` (the training
    loop's own MONAI definitions); a ratio with a zero denominator is None."""
    found = classifier_metrics(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64),
                               threshold)
    result: dict[str, Any] = {name: found.get(name) for name in ("accuracy", "precision", "recall", "specificity")}
    result["sensitivity"] = result["recall"]
    result["f1"] = found.get("f1_score")
    result["confusion"] = confusion(np.asarray(scores) >= threshold, labels)
    return result


def finite_mean(values: np.ndarray) -> float | None:
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if len(finite) else None
