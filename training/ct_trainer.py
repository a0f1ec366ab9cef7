"""Training a CT preset: a 2D U-Net slice by slice on CT series, written as a CT model bundle.

The same shape as :mod:`training.trainer` (which trains radiograph networks), with what differs
for CT: cases (series) are split by patient with the recipe's fractions (64/16/20 for
``ct-seg-unet-resnet50``), every slice of a training case is a training sample, the input is the
slice in HU through the recipe's window (:mod:`contract.ct_preprocess`, the worker's own
definition), and the bundle holds the U-Net alone (``kind: "ct"``, no classifier).

``OUT`` holds the run: ``run.json``, ``splits.csv``, ``metrics.csv`` (one row per epoch),
``checkpoints/best.pt`` and ``bundle/``. Validation after every epoch measures, over all voxels
of the validation slices: Dice, IoU (of the pneumothorax: ``iou``; averaged with the background's:
``mean_iou``), precision, recall, pixel accuracy and the voxel-level ROC AUC (MONAI's confusion
matrix metrics and ``compute_roc_auc``). The best epoch by the monitored metric (Dice) is kept;
training stops after ``patience`` epochs without improvement. Resuming is not offered for CT runs.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from contract.bundle import (
    DEMO_INTENDED_USE,
    Manifest,
    NetworkSpec,
    Preprocessing,
    Thresholds,
    load_bundle,
    write_manifest,
)
from contract.ct_preprocess import window_hu
from contract.networks import build_network, resolve_device
from contract.preprocess import normalise_input, resize_to_input
from training.augment import build_augmentation
from training.cache import CachedImages
from training.ct_datasets import CTCase, CTDatasetIndex, load_case
from training.epochs import CachedDataset, EpochLoop, loss_function, make_optimiser
from training.presets import Preset
from training.splits import make_splits, read_splits, split_counts, write_splits
from training.trainer import BUNDLE_DIR, CHECKPOINTS, RUN_FILE, SPLITS_FILE, TrainingError, TrainResult, network_recipe

__all__ = ["CT_DEFAULT_SPLIT", "segmentation_metrics", "train_ct"]

CT_DEFAULT_SPLIT = (0.64, 0.16, 0.20)
CT_INTENDED_USE = (
    "Research use: measures suspected pneumothorax on adult chest CT; trained with `pleura train` - "
    "validate on local data before any clinical use"
)
_AUC_MAX_VOXELS = 200_000


def _slices(cases: Sequence[CTCase], recipe: Preprocessing, name: str) -> CachedImages:
    """Every slice of ``cases`` on the network grid: windowed images in [0, 1] and masks."""
    images, masks = [], []
    for case in cases:
        loaded = load_case(case)
        for hu, mask in zip(loaded.hu, loaded.mask):
            images.append(resize_to_input(window_hu(hu, recipe), recipe))
            grid = F.interpolate(
                torch.from_numpy(mask.astype(np.float32))[None, None],
                size=(recipe.input_size, recipe.input_size),
                mode="bilinear",
                antialias=True,
            )
            masks.append((grid[0, 0] >= 0.5).numpy().astype(np.uint8))
    labels = np.array([m.any() for m in masks], dtype=bool)
    return CachedImages(Path(name), [f"{name}-{i}" for i in range(len(images))], np.stack(images), np.stack(masks), labels)


def segmentation_metrics(probabilities: torch.Tensor, truth: torch.Tensor, threshold: float) -> dict[str, float]:
    """Voxel-level metrics over all of ``probabilities`` against ``truth`` (same shape, 0/1):
    dice, iou, mean_iou (with the background's IoU), precision, recall, pixel_accuracy, auc."""
    predicted = (probabilities >= threshold).float().reshape(1, -1)
    target = truth.float().reshape(1, -1)
    matrix = get_confusion_matrix(predicted[:, None], target[:, None])  # (1, 1, 4): tp, fp, tn, fn
    tp, fp, tn, fn = (float(v) for v in matrix[0, 0])
    metrics = {
        "dice": float(compute_confusion_matrix_metric("f1 score", matrix)),
        "iou": float(compute_confusion_matrix_metric("threat score", matrix)),
        "precision": float(compute_confusion_matrix_metric("precision", matrix)),
        "recall": float(compute_confusion_matrix_metric("recall", matrix)),
        "pixel_accuracy": float(compute_confusion_matrix_metric("accuracy", matrix)),
    }
    background_iou = tn / (tn + fn + fp) if tn + fn + fp else float("nan")
    metrics["mean_iou"] = (metrics["iou"] + background_iou) / 2.0
    values, labels = probabilities.reshape(-1), truth.reshape(-1).float()
    if labels.min() != labels.max():
        if len(values) > _AUC_MAX_VOXELS:  # a fixed, evenly spaced sample keeps the sort small
            pick = torch.linspace(0, len(values) - 1, _AUC_MAX_VOXELS).long()
            values, labels = values[pick], labels[pick]
        if labels.min() != labels.max():
            metrics["auc"] = float(compute_roc_auc(values, labels))
    return {name: value for name, value in metrics.items() if math.isfinite(value)}


def _validate(
    network: nn.Module, loader: DataLoader, loss_function, recipe: Preprocessing, preset: Preset, device: torch.device
) -> dict[str, float]:
    network.eval()
    losses, count, outputs, truths = 0.0, 0, [], []
    with torch.inference_mode():
        for images, masks, _ in loader:
            output = network(normalise_input(images, recipe).to(device)).float()
            losses += float(loss_function(output, masks.to(device))) * len(images)
            outputs.append(torch.sigmoid(output).cpu())
            truths.append(masks)
            count += len(images)
    metrics = {"val_loss": losses / max(count, 1)}
    found = segmentation_metrics(torch.cat(outputs), torch.cat(truths), preset.mask_threshold)
    metrics.update({f"val_{name}": value for name, value in found.items()})
    return metrics


def train_ct(
    preset: Preset,
    data: CTDatasetIndex,
    out: Path | str,
    *,
    split_file: Path | None = None,
    fractions: Sequence[float] | None = None,
    device: str = "auto",
    name: str | None = None,
    version: str | None = None,
    intended_use: str | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> TrainResult:
    """Train the CT ``preset`` on ``data`` into ``out`` and write ``out/bundle`` (see the module docstring)."""
    console = console or Console(stderr=True, quiet=not progress)
    if preset.kind != "ct":
        raise TrainingError(f"preset {preset.name} is for {preset.kind}, not CT: use `pleura train` with radiographs")
    out_dir = Path(out)
    checkpoints = out_dir / CHECKPOINTS
    best_file = checkpoints / "best.pt"
    if best_file.exists():
        raise TrainingError(f"{out_dir} already holds a run ({best_file}); use another --out")
    checkpoints.mkdir(parents=True, exist_ok=True)
    recipe = network_recipe(preset)  # the one recipe function: with the preset's HU window
    (out_dir / RUN_FILE).write_text(
        json.dumps({"preset": preset.model_dump(mode="json"), "data": str(data.root)}, indent=2) + "\n"
    )

    cases = list(data.cases)
    split_path = Path(split_file) if split_file is not None else out_dir / SPLITS_FILE
    if split_path.exists():
        assignment = read_splits(split_path, cases)
    else:
        assignment = make_splits(cases, fractions or preset.split or CT_DEFAULT_SPLIT, seed=preset.seed)
        write_splits(split_path, cases, assignment)
    train_cases = [c for c in cases if assignment[c.case_id] == "train"]
    val_cases = [c for c in cases if assignment[c.case_id] == "val"]
    if not train_cases or not val_cases:
        raise TrainingError(
            f"too few CT series: {len(train_cases)} to train on and {len(val_cases)} to validate with (split {split_path})"
        )
    console.print(f"reading {len(train_cases)} training and {len(val_cases)} validation series")
    train_slices, val_slices = _slices(train_cases, recipe, "train"), _slices(val_cases, recipe, "val")
    if preset.positives_only:
        keep = np.flatnonzero(train_slices.labels)
    else:
        keep = np.arange(len(train_slices))
    if len(keep) < 2:
        raise TrainingError(f"too few training slices ({len(keep)})")

    target = resolve_device(device)
    torch.manual_seed(preset.seed)
    spec = NetworkSpec(
        architecture=preset.architecture, encoder=preset.encoder, weights_file="segmenter.pt", extra=dict(preset.extra)
    )
    network = build_network(
        spec, recipe, encoder_weights=None if preset.encoder_weights == "none" else preset.encoder_weights
    ).to(target)
    loss = loss_function(preset, None)
    optimiser = make_optimiser(preset, network)
    val_loader = DataLoader(CachedDataset(val_slices, range(len(val_slices)), None), batch_size=preset.batch_size)
    drop_last = len(keep) > preset.batch_size
    steps_per_epoch = len(keep) // preset.batch_size if drop_last else 1
    if preset.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, preset.steps_per_epoch)

    def epoch_loader(epoch_seed: int) -> DataLoader:
        transform = build_augmentation(preset.augment, preset.input_size, True, seed=epoch_seed % 2**32)
        train_set = CachedDataset(train_slices, keep, transform)
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(epoch_seed))
        return DataLoader(train_set, batch_size=preset.batch_size, sampler=sampler, drop_last=drop_last)

    loop = EpochLoop(
        preset, network, optimiser, loss, recipe, target,
        loader=epoch_loader,
        validate=lambda net: _validate(net, val_loader, loss, recipe, preset, target),
        truth=lambda masks, _labels: masks,
        steps_per_epoch=steps_per_epoch, out_dir=out_dir, best_file=best_file, console=console,
        rate_name="slices_per_second", show_rate=False,
    )
    state = loop.run()
    loop.load_best()
    best_epoch, best_metrics, epoch, stopped_early = state.best_epoch, state.best_metrics, state.epoch, state.stopped_early
    synthetic = any(case.synthetic for case in train_cases + val_cases)
    counts = split_counts(cases, assignment)
    described = ", ".join(f"{split} {n} series" for split, (n, _) in counts.items())
    data_note = f"CT series with masks at {data.root}: {described}" + (
        "; synthetic phantoms from training.ct_synthetic, no patient data" if synthetic else ""
    )
    validation = {k: round(v, 4) for k, v in best_metrics.items() if k.startswith("val_") and math.isfinite(v)}
    spec.training = {
        "preset": preset.name,
        "source": preset.source,
        "hyperparameters": preset.model_dump(mode="json", exclude={"name", "source"}),
        "data": data_note,
        "split_file": str(split_path),
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "device": str(target),
        "validation": validation,
        "synthetic": synthetic,
    }
    created = datetime.now(timezone.utc)
    manifest = Manifest(
        name=name or f"pleura-{preset.name}",
        version=version or created.strftime("%Y%m%d.%H%M%S"),
        kind="ct",
        intended_use=DEMO_INTENDED_USE if synthetic else (intended_use or CT_INTENDED_USE),
        synthetic_demo=synthetic,
        created=created.isoformat(timespec="seconds"),
        preprocessing=recipe,
        segmenter=spec,
        thresholds=Thresholds(mask=preset.mask_threshold, min_volume_ml=preset.min_volume_ml),
        training_data=data_note,
        metrics={f"segmenter_{k}": v for k, v in validation.items()},
    )
    bundle_dir = out_dir / BUNDLE_DIR
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle_dir.mkdir(parents=True)
    shutil.copyfile(best_file, bundle_dir / spec.weights_file)
    write_manifest(bundle_dir, manifest)
    bundle = load_bundle(bundle_dir)
    console.print(f"[green]bundle written[/] {bundle.path}: {bundle.identity.label} (best epoch {best_epoch})")
    return TrainResult(bundle, network, recipe, best_epoch, best_metrics, epoch, stopped_early)
