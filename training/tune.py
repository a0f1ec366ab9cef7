"""Threshold tuning: ``pleura tune`` chooses the decision thresholds on the validation split.

The triplet is the classifier probability threshold, the U-Net mask (pixel) threshold and the
minimum mask area in source pixels; the node flags an image when the probability reaches its
threshold and the mask covers at least the minimum area
(:func:`~contract.decision.flag_decision`). The networks run once over the validation
images (:func:`training.evaluate.collect_statistics` keeps pixel counts for every mask threshold
of the grid); every triplet of the grid is then scored from those counts with the worker's own
decision rule, so the search costs seconds, not network passes.

Targets:

- ``leaderboard``: the triplet with the best SIIM-ACR leaderboard metric (needs masks);
- ``min_sensitivity``: among the triplets whose decision sensitivity reaches the target, the most
  specific (triage: few missed pneumothoraces, then as few false flags as possible); ties go to the
  better leaderboard metric.

The thresholds are written into the bundle's manifest with a ``tuning`` record (target, split,
grid, resulting validation metrics, the previous thresholds): in place (atomic rename), or with
``out`` as a copy with a new version, for a bundle that must not change (a registered version).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from config.errors import PleuraError
from contract.bundle import Bundle, Thresholds, load_bundle, write_manifest
from contract.decision import flag_decision
from training.evaluate import HeldOut, ImageStatistics, summarise
from training.metrics import dice_from_counts
from contract.active import is_registered_version
from training.demo_model import DEMO_NAME

__all__ = ["Grid", "Sweep", "Target", "TuneError", "TuneResult", "check_in_place", "choose", "default_grid", "sweep",
           "tuning_record", "write_tuned_bundle"]

PROBABILITY_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # 0, 0.05, ... 0.95
MASK_GRID = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 ... 0.9
AREA_FRACTIONS = (0.0, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
"""Minimum areas as fractions of the median image's pixels (at 1024x1024: 0, 105, 262 ... 8389 px)."""


class TuneError(PleuraError, ValueError):
    """Tuning that cannot run or cannot meet its target; the message says why."""


@dataclass(frozen=True)
class Target:
    kind: Literal["leaderboard", "min_sensitivity"]
    min_sensitivity: float | None = None

    def describe(self) -> str:
        if self.kind == "leaderboard":
            return "best SIIM-ACR leaderboard metric"
        return f"highest specificity with decision sensitivity >= {self.min_sensitivity:g}"


@dataclass(frozen=True)
class Grid:
    probabilities: tuple[float, ...]
    mask_thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]

    def as_dict(self) -> dict[str, list]:
        return {"probability": list(self.probabilities), "mask": list(self.mask_thresholds),
                "min_area_px": list(self.min_areas)}


def _values(values, kind=float) -> tuple:
    return tuple(sorted({kind(v) for v in values}))


def default_mask_grid(current: Thresholds) -> tuple[float, ...]:
    return _values([*MASK_GRID, current.mask])


def default_grid(stats: ImageStatistics, current: Thresholds) -> Grid:
    """The default search grid: the mask thresholds the statistics were collected at, probabilities
    0..0.95 and minimum areas as fractions of the median image, each with the bundle's ``current`` value."""
    pixels = float(np.median([rows * columns for rows, columns in stats.shapes])) if stats.shapes else 1024.0**2
    return Grid(
        probabilities=_values([*PROBABILITY_GRID, current.probability]),
        mask_thresholds=_values(stats.mask_thresholds.tolist()),
        # A classifier-only bundle has no mask: only the probability is tuned.
        min_areas=[0] if stats.classifier_only else _values(
            [*(round(f * pixels) for f in AREA_FRACTIONS), current.min_area_px], int
        ),
    )


@dataclass
class Sweep:
    """Validation metrics of every triplet, arrays indexed (mask threshold, probability, minimum area)."""

    grid: Grid
    sensitivity: np.ndarray
    specificity: np.ndarray
    leaderboard: np.ndarray
    """NaN without masks."""


def sweep(stats: ImageStatistics, grid: Grid) -> Sweep:
    """Score every triplet of ``grid`` from the statistics, with the worker's decision rule."""
    labels = stats.labels
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        raise TuneError(f"the validation images need both classes; they hold {positives} positive and "
                        f"{negatives} negative image(s)")
    probabilities = np.asarray(grid.probabilities)[None, :, None]
    areas = np.asarray(grid.min_areas)[None, None, :]
    shape = (len(grid.mask_thresholds), len(grid.probabilities), len(grid.min_areas))
    sensitivity, specificity, leaderboard = np.zeros(shape), np.zeros(shape), np.full(shape, np.nan)
    nothing_to_find = (stats.truth_1024 == 0).astype(np.float64)[:, None, None]
    for t, mask_threshold in enumerate(grid.mask_thresholds):
        k = stats.threshold_index(mask_threshold)
        flagged = flag_decision(stats.probabilities[:, None, None], stats.area_px[:, k, None, None],
                                probabilities, areas)
        sensitivity[t] = flagged[labels].sum(axis=0) / positives
        specificity[t] = 1.0 - flagged[~labels].sum(axis=0) / negatives
        if stats.has_masks:
            dice = dice_from_counts(stats.intersection_1024[:, k], stats.predicted_1024[:, k], stats.truth_1024)
            leaderboard[t] = np.where(flagged, dice[:, None, None], nothing_to_find).mean(axis=0)
    return Sweep(grid, sensitivity, specificity, leaderboard)


def choose(result: Sweep, target: Target) -> Thresholds:
    """The triplet that meets ``target`` best (ties: the higher thresholds, the more conservative)."""
    board = np.nan_to_num(result.leaderboard, nan=-1.0).ravel()
    sensitivity, specificity = result.sensitivity.ravel(), result.specificity.ravel()
    if target.kind == "leaderboard":
        if np.all(board < 0):
            raise TuneError("the leaderboard target needs true masks and a U-Net; this data set or bundle has none (use --min-sensitivity)")
        order = np.lexsort((specificity, sensitivity, board))  # last key first
        candidates = order
    else:
        wanted = float(target.min_sensitivity or 0.0)
        feasible = sensitivity >= wanted - 1e-9
        if not feasible.any():
            raise TuneError(f"no threshold triplet of the grid reaches sensitivity {wanted:g} on the validation "
                            f"split (best: {sensitivity.max():.3f})")
        order = np.lexsort((board, specificity))
        candidates = order[feasible[order]]
    t, p, a = np.unravel_index(int(candidates[-1]), result.sensitivity.shape)
    grid = result.grid
    return Thresholds(probability=grid.probabilities[p], mask=grid.mask_thresholds[t], min_area_px=grid.min_areas[a])


@dataclass
class TuneResult:
    thresholds: Thresholds
    metrics: dict[str, Any]
    """:func:`training.evaluate.summarise` on the validation split at the chosen thresholds."""
    sweep: Sweep


def tune(stats: ImageStatistics, target: Target, grid: Grid) -> TuneResult:
    """Choose the thresholds for ``target`` on the validation statistics."""
    result = sweep(stats, grid)
    chosen = choose(result, target)
    return TuneResult(chosen, summarise(stats, chosen), result)


def tuning_record(
    bundle: Bundle, result: TuneResult, target: Target, held_out: HeldOut, data_description: str
) -> dict[str, Any]:
    """What the manifest keeps about a tuning: target, split, grid, before and after."""
    decided, classification = result.metrics["decision"], result.metrics["classification"]
    validation = {
        "sensitivity": decided.get("sensitivity"),
        "specificity": decided.get("specificity"),
        "precision": decided.get("precision"),
        "accuracy": decided.get("accuracy"),
        "leaderboard": decided.get("leaderboard"),
        "classifier_auc": classification.get("auc"),
    }
    return {
        "target": target.describe(),
        "target_kind": target.kind,
        "min_sensitivity": target.min_sensitivity,
        "split": held_out.split,
        "split_file": str(held_out.split_file or ""),
        "data": data_description,
        "images": result.metrics["images"],
        "positives": result.metrics["positives"],
        "previous_thresholds": bundle.manifest.thresholds.model_dump(),
        "thresholds": result.thresholds.model_dump(),
        "validation": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in validation.items()},
        "grid": result.sweep.grid.as_dict(),
        "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_in_place(bundle: Bundle, version: str | None = None) -> None:
    """Refuse, before any work, a bundle that must not be tuned in place (the message says to use --out)."""
    if version is not None:
        raise TuneError("--version needs --out: a bundle tuned in place keeps its version")
    if bundle.manifest.name == DEMO_NAME and bundle.manifest.synthetic_demo:
        raise TuneError(f"{bundle.path} is the demo bundle, which `pleura demo-model` rebuilds with its own "
                        "thresholds: give --out DIR to write a tuned copy")
    if is_registered_version(bundle.path):
        raise TuneError(f"{bundle.path} is a registered version, which never changes: give --out DIR to write a "
                        "tuned copy, then `pleura models import` it")
    if not os.access(bundle.path, os.W_OK):
        raise TuneError(f"{bundle.path} is not writable: give --out DIR to write a tuned copy")


def write_tuned_bundle(
    bundle: Bundle, thresholds: Thresholds, record: dict[str, Any], *, out: Path | str | None = None,
    version: str | None = None,
) -> Bundle:
    """Write ``thresholds`` and the tuning ``record`` into the bundle's manifest.

    In place, the manifest is replaced by an atomic rename (the weights do not change). With
    ``out``, the bundle is copied there with a new version (``version`` or ``<old>-tuned.<UTC time>``)
    and the original is left as it was.
    """
    manifest = bundle.manifest.model_copy(deep=True)
    manifest.thresholds = Thresholds.model_validate(thresholds.model_dump())
    manifest.tuning = record
    manifest.metrics.update(
        {f"decision_val_{name}": value for name, value in record["validation"].items()
         if isinstance(value, (int, float)) and name != "classifier_auc"}
    )
    if out is None:
        check_in_place(bundle, version)
        write_manifest(bundle.path, manifest)
        return load_bundle(bundle.path)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TuneError(f"{target} already exists and is not empty: give another --out")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")
    manifest.version = version or f"{bundle.manifest.version}-tuned.{stamp}"
    manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(bundle.path, work, dirs_exist_ok=True)
        write_manifest(work, manifest)
        if target.exists():
            target.rmdir()
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return load_bundle(target)
