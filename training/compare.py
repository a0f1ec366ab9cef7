"""``pleura compare``: several bundles evaluated on one split, in one table of quality against
inference time and memory (the backbone comparison the U-Net recipes call for).

The bundles come from presets trained on the same split (each in ``OUT/PRESET``) or are given; each
is evaluated by :func:`training.evaluate.evaluate_bundle` on the same held-out images, and its row
says what it trained, how good its decisions are and what they cost.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.evaluate import Evaluation

__all__ = ["COLUMNS", "CompareEntry", "comparison_rows", "write_comparison"]

COLUMNS: tuple[tuple[str, str], ...] = (
    ("model", "model"),
    ("preset", "preset"),
    ("trained", "trained network"),
    ("images", "images"),
    ("auc", "AUC"),
    ("auc_ci95", "AUC 95% CI"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("dice", "Dice (positives)"),
    ("leaderboard", "leaderboard"),
    ("ms_per_image", "ms/image"),
    ("classifier_ms", "classifier ms/image"),
    ("segmenter_ms", "U-Net ms/image"),
    ("peak_mb", "peak MB"),
    ("classifier_peak_mb", "classifier peak MB"),
    ("segmenter_peak_mb", "U-Net peak MB"),
    ("device", "device"),
    ("synthetic_demo", "synthetic demo"),
    ("bundle", "bundle"),
)


@dataclass
class CompareEntry:
    label: str
    preset: str | None
    """The preset trained for this row, None for a bundle given as it was."""
    role: str | None
    """``classifier`` or ``segmenter``: the network the preset trained."""
    evaluation: Evaluation


def _network(evaluation: Evaluation, role: str | None) -> str:
    manifest = evaluation.bundle.manifest
    roles = [role] if role else ["classifier", "segmenter"]
    described = []
    for name in roles:
        spec = getattr(manifest, name)
        described.append(f"{name}: {spec.architecture}" + (f" ({spec.encoder})" if spec.encoder else ""))
    return "; ".join(described)


def comparison_rows(entries: Sequence[CompareEntry]) -> list[dict[str, Any]]:
    """One row per bundle, keyed by :data:`COLUMNS`."""
    rows = []
    for entry in entries:
        metrics = entry.evaluation.metrics
        classification, decided = metrics["classification"], metrics["decision"]
        resources = metrics["resources"]
        networks = resources.get("networks", {})
        ci = classification.get("auc_ci95")
        rows.append(
            {
                "model": entry.label,
                "preset": entry.preset or "",
                "trained": _network(entry.evaluation, entry.role),
                "images": metrics["images"],
                "auc": classification.get("auc"),
                "auc_ci95": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else None,
                "sensitivity": decided.get("sensitivity"),
                "specificity": decided.get("specificity"),
                "dice": metrics["segmentation"].get("dice"),
                "leaderboard": decided.get("leaderboard"),
                "ms_per_image": 1000.0 * resources["seconds_per_image"],
                "classifier_ms": networks.get("classifier", {}).get("ms_per_image"),
                "segmenter_ms": networks.get("segmenter", {}).get("ms_per_image"),
                "peak_mb": resources.get("peak_memory_mb"),
                "classifier_peak_mb": networks.get("classifier", {}).get("peak_mb"),
                "segmenter_peak_mb": networks.get("segmenter", {}).get("peak_mb"),
                "device": resources["device"],
                "synthetic_demo": "SYNTHETIC DEMO" if entry.evaluation.bundle.manifest.synthetic_demo else "no",
                "bundle": str(entry.evaluation.bundle.path),
            }
        )
    return rows


def format_cell(value: Any) -> str:
    """A table cell: numbers with 3 decimals (times and memory with 1), missing as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def write_comparison(rows: Sequence[dict[str, Any]], out_dir: Path | str, note: str = "") -> tuple[Path, Path]:
    """``OUT/compare.csv`` (full precision) and ``OUT/compare.md`` (a readable table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "compare.csv", out / "compare.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow([key for key, _ in COLUMNS])
        for row in rows:
            writer.writerow(["" if row[key] is None else row[key] for key, _ in COLUMNS])
    shown = [(key, header) for key, header in COLUMNS if key != "bundle"]
    lines = ["# Model comparison", ""]
    if note:
        lines += [note, ""]
    lines += [
        "| " + " | ".join(header for _, header in shown) + " |",
        "|" + "---|" * len(shown),
        *("| " + " | ".join(format_cell(row[key]) for key, _ in shown) + " |" for row in rows),
        "",
        "Sensitivity, specificity and the SIIM-ACR leaderboard metric are the node's decision (classifier + mask "
        "+ minimum area); AUC is the classifier's, Dice the U-Net's on the images with pneumothorax. ms/image is "
        "the whole decision path (decode, preprocess, both networks, decision); the per-network columns time each "
        "network alone. Each model's own report is in its evaluation folder.",
        "",
    ]
    if any(row["synthetic_demo"] != "no" for row in rows):
        lines += ["A SYNTHETIC DEMO model was trained (in part) on generated images: not for clinical use, and its "
                  "numbers say nothing about real radiographs.", ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path
