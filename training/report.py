"""The evaluation report a person reads: PNG plots and one self-contained ``report.html``.

The plots (matplotlib, drawn off-screen with the Agg canvas) are written to ``OUT/plots/`` and
embedded in the page as ``data:image/png;base64`` URIs, with the style inline: the page opens with
no network and no other file, so it can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from contract.bundle import Bundle
    from training.evaluate import Case, Evaluation

__all__ = ["PLOTS_DIR", "REPORT_NAME", "training_runs", "write_report"]

REPORT_NAME = "report.html"
PLOTS_DIR = "plots"
TRUTH_COLOUR, PREDICTED_COLOUR, UNFLAGGED_COLOUR = "#22c55e", "#ef4444", "#facc15"


def _figure(width: float = 4.5, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def training_runs(bundle: Bundle) -> list[tuple[str, list[dict[str, str]]]]:
    """The training curves (``metrics.csv``) of the runs that made the bundle's networks, when the
    run directories are still there: (label, rows) per run."""
    trained = {
        spec.training.get("preset"): role
        for role, spec in (("classifier", bundle.manifest.classifier), ("segmenter", bundle.manifest.segmenter))
        if spec.training.get("preset")
    }
    candidates = [bundle.path.parent]
    for spec in (bundle.manifest.classifier, bundle.manifest.segmenter):
        if spec.training.get("split_file"):
            candidates.append(Path(spec.training["split_file"]).parent)
    runs: list[tuple[str, list[dict[str, str]]]] = []
    seen: set[Path] = set()
    for directory in candidates:
        directory = directory.resolve()
        metrics, run = directory / "metrics.csv", directory / "run.json"
        if directory in seen or not metrics.is_file() or not run.is_file():
            continue
        seen.add(directory)
        try:
            preset = json.loads(run.read_text())["preset"]["name"]
        except (ValueError, KeyError, TypeError):
            continue
        if preset not in trained:
            continue
        with metrics.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            runs.append((f"{trained[preset]}: {preset} ({directory})", rows))
    return runs


def _roc_plot(labels: np.ndarray, scores: np.ndarray, auc: float | None, threshold: float) -> bytes:
    from sklearn.metrics import roc_curve

    figure = _figure()
    axes = figure.add_subplot()
    fpr, tpr, cut = roc_curve(labels, scores)
    axes.plot(fpr, tpr, color="#2563eb", label=f"classifier (AUC {auc:.3f})" if auc is not None else "classifier")
    at = (scores >= threshold)
    axes.plot([at[~labels].mean()], [at[labels].mean()], "o", color="#111827", label=f"threshold {threshold:g}")
    axes.plot([0, 1], [0, 1], ":", color="#9ca3af")
    axes.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity", title="ROC curve",
             xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right")
    return _png(figure)


def _pr_plot(labels: np.ndarray, scores: np.ndarray) -> bytes:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure = _figure()
    axes = figure.add_subplot()
    precision, recall, _ = precision_recall_curve(labels, scores)
    axes.plot(recall, precision, color="#7c3aed", label=f"AP {average_precision_score(labels, scores):.3f}")
    axes.axhline(labels.mean(), linestyle=":", color="#9ca3af", label=f"prevalence {labels.mean():.2f}")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall curve",
             xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower left")
    return _png(figure)


def _confusion_plot(matrices: Sequence[tuple[str, dict[str, int]]]) -> bytes:
    figure = _figure(4.2 * len(matrices), 3.8)
    for number, (title, counts) in enumerate(matrices, start=1):
        axes = figure.add_subplot(1, len(matrices), number)
        grid = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]])
        axes.imshow(grid, cmap="Blues")
        for (row, column), value in np.ndenumerate(grid):
            colour = "white" if value > grid.max() / 2 else "black"
            axes.text(column, row, str(value), ha="center", va="center", color=colour, fontsize=14)
        axes.set_xticks([0, 1], ["negative", "positive"])
        first = number == 1
        axes.set_yticks([0, 1], ["no pneumothorax", "pneumothorax"] if first else ["", ""])
        axes.set(xlabel="predicted", ylabel="truth" if first else "", title=title)
    figure.tight_layout()
    return _png(figure)


def _dice_histogram(unet_dice: np.ndarray, leaderboard: np.ndarray) -> bytes:
    figure = _figure(5.5, 3.8)
    axes = figure.add_subplot()
    bins = np.linspace(0, 1, 21)
    positives = unet_dice[np.isfinite(unet_dice)]
    axes.hist(positives, bins=bins, color="#2563eb", alpha=0.7, label=f"U-Net Dice, positives (n={len(positives)})")
    axes.hist(leaderboard[np.isfinite(leaderboard)], bins=bins, histtype="step", color="#111827", linewidth=1.5,
              label="leaderboard Dice, all images (decision)")
    axes.set(xlabel="Dice", ylabel="images", title="Dice per image")
    axes.legend(loc="upper center")
    return _png(figure)


def _training_plot(runs: Sequence[tuple[str, list[dict[str, str]]]]) -> bytes:
    figure = _figure(6.0, 3.4 * len(runs))
    for number, (label, rows) in enumerate(runs, start=1):
        axes = figure.add_subplot(len(runs), 1, number)
        epochs = [float(row["epoch"]) for row in rows]
        for name, colour in (("train_loss", "#2563eb"), ("val_loss", "#f97316")):
            values = [float(row[name]) if row.get(name) else np.nan for row in rows]
            axes.plot(epochs, values, marker="o", color=colour, label=name)
        axes.set(xlabel="epoch", ylabel="loss", title=label if len(label) < 70 else label[:67] + "...")
        quality = next((name for name in ("val_auc", "val_dice") if rows[0].get(name)), None)
        if quality:
            twin = axes.twinx()
            twin.plot(epochs, [float(row[quality]) if row.get(quality) else np.nan for row in rows],
                      marker="s", color="#16a34a", label=quality)
            twin.set_ylabel(quality)
            twin.legend(loc="upper right")
        axes.legend(loc="upper left")
    figure.tight_layout()
    return _png(figure)


def _case_plot(case: Case) -> bytes:
    figure = _figure(3.2, 3.4)
    axes = figure.add_subplot()
    axes.imshow(case.image, cmap="gray", vmin=0, vmax=1, interpolation="lanczos")
    if case.truth is not None and case.truth.any():
        axes.contour(case.truth.astype(float), levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.4)
    if case.unet_mask.any():
        colour = PREDICTED_COLOUR if case.flagged else UNFLAGGED_COLOUR
        style = "solid" if case.flagged else "dashed"
        axes.contour(case.unet_mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.4, linestyles=style)
    axes.set_axis_off()
    return _png(figure)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(rows: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(name)}</th><td>{_number(value)}</td></tr>" for name, value in rows)
    return f"<table>{cells}</table>"


def _ratio_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("accuracy", metrics.get("accuracy")),
        ("sensitivity (recall)", metrics.get("sensitivity")),
        ("specificity", metrics.get("specificity")),
        ("precision (PPV)", metrics.get("precision")),
        ("F1", metrics.get("f1")),
    ]


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #111827; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #e5e7eb; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0 1em; } th, td { padding: .25em .8em; border: 1px solid #e5e7eb; }
th { text-align: left; background: #f9fafb; font-weight: 600; } td { font-variant-numeric: tabular-nums; }
.banner { background: #fef3c7; border: 2px solid #d97706; padding: .6em 1em; font-weight: 700; }
.note { background: #eff6ff; border-left: 4px solid #2563eb; padding: .5em 1em; }
.warn { background: #fef2f2; border-left: 4px solid #dc2626; padding: .5em 1em; }
.plots img { max-width: 100%; margin: .3em; border: 1px solid #e5e7eb; }
.cases { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: .8em; }
figure { margin: 0; border: 1px solid #e5e7eb; padding: .4em; } figure img { width: 100%; }
figcaption { font-size: 12px; word-break: break-all; }
.key span { display: inline-block; width: 1.6em; height: .35em; margin: 0 .3em .15em 1em; vertical-align: middle; }
"""


def write_report(evaluation: Evaluation, out_dir: Path | str) -> dict[str, Path]:
    """Write ``plots/*.png`` and ``report.html`` for an evaluation; returns them by name."""
    out = Path(out_dir)
    plots = out / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    stats, decision, metrics = evaluation.stats, evaluation.decision, evaluation.metrics
    labels, scores = stats.labels, stats.probabilities
    thresholds = evaluation.thresholds
    classification, decided = metrics["classification"], metrics["decision"]
    images: dict[str, bytes] = {}
    both_classes = bool(labels.any() and (~labels).any())
    if both_classes:
        images["roc"] = _roc_plot(labels, scores, classification.get("auc"), thresholds.probability)
        images["precision_recall"] = _pr_plot(labels, scores)
    images["confusion"] = _confusion_plot(
        [
            (f"classifier (p >= {thresholds.probability:g})", classification["confusion"]),
            ("decision (classifier + mask + area)", decided["confusion"]),
        ]
    )
    if stats.has_masks:
        images["dice_histogram"] = _dice_histogram(decision.unet_dice, decision.leaderboard)
    runs = training_runs(evaluation.bundle)
    if runs:
        images["training_curves"] = _training_plot(runs)
    written: dict[str, Path] = {}
    for name, png in images.items():
        path = plots / f"{name}.png"
        path.write_bytes(png)
        written[f"plot_{name}"] = path
    case_images: list[tuple[Case, bytes]] = []
    for number, case in enumerate(evaluation.cases):
        png = _case_plot(case)
        path = plots / f"case_{number:02d}_{case.group}.png"
        path.write_bytes(png)
        case_images.append((case, png))

    report = out / REPORT_NAME
    report.write_text(_html(evaluation, images, case_images, runs), encoding="utf-8")
    written["report"] = report
    return written


def _html(
    evaluation: Evaluation,
    images: dict[str, bytes],
    cases: Sequence[tuple[Case, bytes]],
    runs: Sequence[tuple[str, list[dict[str, str]]]],
) -> str:
    metrics = evaluation.metrics
    model, classification = metrics["model"], metrics["classification"]
    segmentation, decided, resources = metrics["segmentation"], metrics["decision"], metrics["resources"]
    thresholds = evaluation.thresholds
    title = f"Evaluation of {model['name']} {model['version']}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    if model["synthetic_demo"]:
        parts.append("<p class='banner'>SYNTHETIC DEMO MODEL - not for clinical use. "
                     "It was trained on generated images; these numbers say nothing about real radiographs.</p>")
    split_class = "warn" if metrics["split"]["name"] == "all" else "note"
    parts.append(f"<p class='{split_class}'>Evaluated on {html.escape(metrics['split']['note'])}.</p>")

    parts.append("<h2 id='summary'>Summary</h2>")
    ci = classification.get("auc_ci95")
    parts.append(_table([
        ("model", f"{model['name']} {model['version']}"),
        ("bundle", model["path"]),
        ("intended use", model["intended_use"]),
        ("data", metrics["data"]),
        ("images evaluated", metrics["images"]),
        ("with pneumothorax", metrics["positives"]),
        ("thresholds (probability / mask / minimum area px)",
         f"{thresholds.probability:g} / {thresholds.mask:g} / {thresholds.min_area_px}"),
        ("ROC AUC (95% CI)", "n/a" if classification.get("auc") is None else
         f"{classification['auc']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")),
        ("decision sensitivity / specificity",
         f"{_number(decided.get('sensitivity'))} / {_number(decided.get('specificity'))}"),
        ("SIIM-ACR leaderboard metric", decided.get("leaderboard")),
        ("written", datetime.now(timezone.utc).isoformat(timespec="seconds")),
    ]))

    parts.append("<h2 id='classification'>Classification</h2>")
    parts.append(f"<p>The classifier alone, at its probability threshold {thresholds.probability:g}.</p>")
    parts.append(_table([("ROC AUC", classification.get("auc")),
                         ("ROC AUC 95% CI", f"{ci[0]:.3f} - {ci[1]:.3f}" if ci else None),
                         *_ratio_rows(classification)]))
    figures = [images[name] for name in ("roc", "precision_recall") if name in images]
    parts.append("<div class='plots'>" + "".join(f"<img alt='curve' src='{_data_uri(p)}'>" for p in figures) + "</div>")

    parts.append("<h2 id='segmentation'>Segmentation</h2>")
    if segmentation["available"]:
        parts.append(f"<p>The U-Net alone at mask threshold {thresholds.mask:g}, on the images with pneumothorax "
                     "(source pixel grid), and the leaderboard metric of its masks with no classifier.</p>")
        parts.append(_table([
            ("images with pneumothorax", segmentation["positives"]),
            ("Dice (mean)", segmentation.get("dice")),
            ("Dice (median)", segmentation.get("dice_median")),
            ("IoU (mean)", segmentation.get("iou")),
            ("leaderboard metric, U-Net masks only", segmentation.get("leaderboard_unet_only")),
        ]))
        if "dice_histogram" in images:
            parts.append(f"<div class='plots'><img alt='Dice histogram' src='{_data_uri(images['dice_histogram'])}'></div>")
    else:
        parts.append("<p>The data set has no masks: segmentation is not measured.</p>")

    parts.append("<h2 id='decision'>Decision</h2>")
    parts.append(f"<p>What the node decides: flagged when the classifier probability is at least "
                 f"{thresholds.probability:g} and the U-Net mask (pixels at least {thresholds.mask:g}) covers at least "
                 f"{thresholds.min_area_px} source pixels.</p>")
    parts.append(_table([*_ratio_rows(decided), ("SIIM-ACR leaderboard metric", decided.get("leaderboard"))]))
    parts.append(f"<div class='plots'><img alt='confusion matrices' src='{_data_uri(images['confusion'])}'></div>")

    parts.append("<h2 id='speed'>Inference time and memory</h2>")
    parts.append(f"<p>Device {html.escape(resources['device'])}. Time per image is the node's path: read and "
                 "decode, preprocess, both networks, mask and decision (metrics excluded).</p>")
    rows = [("whole decision path", f"{1000 * resources['seconds_per_image']:.1f} ms/image",
             _number(resources.get("peak_memory_mb"), 1) + " MB peak", "")]
    for role, profile in resources.get("networks", {}).items():
        rows.append((role, f"{profile['ms_per_image']:.1f} ms/image", f"{profile['peak_mb']:.1f} MB peak",
                     f"{profile['weights_mb']:.1f} MB weights"))
    parts.append("<table><tr><th></th><th>time</th><th>memory</th><th></th></tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows) + "</table>")

    parts.append("<h2 id='training'>Training curves</h2>")
    if "training_curves" in images:
        parts.append("<p>" + "<br>".join(html.escape(label) for label, _ in runs) + "</p>")
        parts.append(f"<div class='plots'><img alt='training curves' src='{_data_uri(images['training_curves'])}'></div>")
    else:
        parts.append("<p>Not available: the run directories that trained this bundle's networks (with metrics.csv) "
                     "were not found next to the bundle.</p>")

    parts.append("<h2 id='cases'>Cases: best, worst and borderline</h2>")
    parts.append(f"<p class='key'>Outlines:<span style='background:{TRUTH_COLOUR}'></span>truth"
                 f"<span style='background:{PREDICTED_COLOUR}'></span>predicted (flagged)"
                 f"<span style='background:{UNFLAGGED_COLOUR}'></span>U-Net mask, not flagged (dashed). "
                 "Worst: lowest per-image leaderboard Dice; best: highest, among images with pneumothorax; "
                 "borderline: classifier probability closest to the threshold.</p>")
    for group in ("best", "worst", "borderline"):
        chosen = [(case, png) for case, png in cases if case.group == group]
        if not chosen:
            continue
        parts.append(f"<h3>{group}</h3><div class='cases'>")
        for case, png in chosen:
            caption = (f"{html.escape(case.example.image_id)}<br>truth: {'pneumothorax' if case.example.positive else 'none'}; "
                       f"p = {case.probability:.3f}; {'FLAGGED' if case.flagged else 'not flagged'}; "
                       f"mask {case.area_px} px" + (f"; Dice {case.dice:.3f}" if case.dice is not None else ""))
            parts.append(f"<figure><img alt='case' src='{_data_uri(png)}'><figcaption>{caption}</figcaption></figure>")
        parts.append("</div>")

    parts.append("<h2 id='methods'>Methods</h2><ul>")
    for text in metrics["methods"].values():
        parts.append(f"<li>{html.escape(text)}</li>")
    parts.append("<li>Accuracy, precision, recall, specificity and F1: MONAI's confusion-matrix metrics, as in "
                 "training; ROC and precision-recall curves: scikit-learn.</li></ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
