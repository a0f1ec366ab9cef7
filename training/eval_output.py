"""What ``pleura evaluate`` writes: ``metrics.json``, ``per_image.csv``, the predictions file in the
SIIM-ACR submission layout, and the report (:mod:`training.report`)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate import Decision, Evaluation, ImageStatistics
from training.report import write_report
from training.rle import EMPTY_RLE

__all__ = ["json_text", "write_evaluation", "write_predictions"]


def write_predictions(path: Path | str, stats: ImageStatistics, decision: Decision, mask_threshold: float) -> Path:
    """The decisions in the SIIM-ACR submission format: ``ImageId,EncodedPixels``, the U-Net mask of a
    flagged image in the training data's RLE, ``-1`` for an image not flagged."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rles = stats.unet_rles.get(float(mask_threshold))
    if rles is None:
        raise ValueError(f"no RLE kept for mask threshold {mask_threshold}")
    with target.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["ImageId", "EncodedPixels"])
        for example, flagged, rle in zip(stats.examples, decision.flagged, rles):
            writer.writerow([example.image_id, rle if flagged else EMPTY_RLE])
    return target


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


def write_evaluation(evaluation: Evaluation, out: Path | str, predictions: Path | str | None = None) -> dict[str, Path]:
    """``OUT/metrics.json``, ``OUT/per_image.csv``, the report (``OUT/report.html`` and ``OUT/plots/``),
    and the predictions file when asked. Returns what was written, by name."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json_text(evaluation.metrics))
    written["metrics"] = metrics_path
    stats, decision = evaluation.stats, evaluation.decision
    per_image = out_dir / "per_image.csv"
    k = stats.threshold_index(evaluation.thresholds.mask)
    with per_image.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            ["image_id", "patient_id", "positive", "probability", "area_px", "flagged", "unet_dice", "leaderboard_dice"]
        )
        for i, example in enumerate(stats.examples):
            writer.writerow(
                [
                    example.image_id,
                    example.patient_id,
                    int(example.positive),
                    _cell(float(stats.probabilities[i])),
                    int(stats.area_px[i, k]),
                    int(decision.flagged[i]),
                    _cell(float(decision.unet_dice[i])),
                    _cell(float(decision.leaderboard[i])),
                ]
            )
    written["per_image"] = per_image
    if predictions is not None:
        written["predictions"] = write_predictions(predictions, stats, decision, evaluation.thresholds.mask)
    written.update(write_report(evaluation, out_dir))
    return written


def _plain(value: Any) -> Any:
    """JSON-ready: NumPy numbers as Python numbers, paths as text, NaN and infinity as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def json_text(value: Any) -> str:
    """Strict JSON (no NaN) of a metrics record."""
    return json.dumps(_plain(value), indent=2, allow_nan=False) + "\n"
