"""Build the synthetic demo model bundle: small networks trained for a few minutes on generated images.

The demo bundle lets Pleura run end to end without patient data or downloaded weights, and it is
made by the code users train with: the images are written as DICOM in the SIIM-ACR layout, indexed
by :func:`~training.datasets.read_siim` and trained by :func:`~training.trainer.train_in_turn`
(what ``pleura train --preset CLASSIFIER --preset UNET`` runs) with two demo presets, small
enough for a CPU. Then the held-out (test) images go through the worker's own inference path
(:func:`~worker.inference.predict.predict_images` on the written bundle) for the manifest's
metrics. The manifest says the model is a synthetic demo, and so does everything made with it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.metrics import compute_roc_auc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contract.bundle import (
    DEMO_INTENDED_USE,
    Bundle,
    BundleError,
    Manifest,
    Thresholds,
    load_bundle,
    write_manifest,
)
from contract.networks import build_network, load_models
from contract.preprocess import decode_radiograph
from training.datasets import Example, read_siim
from training.presets import Augmentation, Preset, get_preset, with_overrides
from training.splits import make_splits, split_counts, write_splits
from training.synthetic import write_siim_dataset
from training.trainer import network_recipe, network_spec, train_in_turn
from worker.inference.predict import predict_images

__all__ = ["DEMO_NAME", "DEMO_VERSION", "build_demo_bundle", "demo_presets", "ensure_demo_bundle"]

DEMO_NAME = "pleura-demo"
DEMO_VERSION = "0.2.0-demo"
DEMO_SPLIT = (0.75, 0.125, 0.125)
"""Train / validation (best epoch) / held-out (the manifest's metrics) fractions, by patient."""
BATCH_SIZE = 16


def demo_presets(seed: int = 0, epochs: int = 5) -> tuple[Preset, Preset]:
    """The demo's classifier and U-Net presets: the published recipes' networks, cut down to train
    on two CPU cores in minutes, on 128 px inputs, no augmentation, Adam at 2e-3 with a cosine
    schedule, ``epochs`` epochs (no early stop)."""
    common = {
        "input_size": 128, "channels": 1, "normalisation": "unit", "lr": 2e-3, "batch_size": BATCH_SIZE,
        "epochs": epochs, "patience": 0, "scheduler": "cosine", "augment": Augmentation.off().model_dump(),
        "seed": seed,
    }
    # DenseNet-121's four dense blocks (6, 12, 24, 16 layers) with narrow layers.
    classifier = with_overrides(
        get_preset("cls-densenet121"),
        {**common, "extra": {"init_features": 16, "growth_rate": 8, "block_config": [6, 12, 24, 16]}},
    )
    # A U-Net on a ResNet-34 encoder cut to three stages (at full depth it is too slow to train on
    # two CPU cores in minutes); the timm variant ("tu-") holds only the stages it uses, so the
    # weights file is ~6 MB instead of ~90 MB. Dice + BCE on every image, negatives included.
    segmenter = with_overrides(
        get_preset("seg-unet-resnet34-dicefocal"),
        {
            **common, "encoder": "tu-resnet34", "extra": {"encoder_depth": 3, "decoder_channels": [64, 32, 16]},
            "loss": "dice_bce", "positives_only": False,
        },
    )
    source = "Pleura's synthetic demo recipe, after {}"
    return (
        classifier.model_copy(update={"name": "demo-cls-densenet121", "source": source.format(classifier.source)}),
        segmenter.model_copy(update={"name": "demo-seg-unet-resnet34", "source": source.format(segmenter.source)}),
    )


def _untrained_base(out: Path, presets: tuple[Preset, Preset], image_size: int, seed: int) -> Bundle:
    """A bundle with both demo networks freshly initialised: the base the first stage takes its
    other network from (the second stage replaces it). Synthetic demo, so is what is made from it."""
    classifier, segmenter = presets
    recipe = network_recipe(classifier)
    manifest = Manifest(
        name=DEMO_NAME,
        version="untrained",
        intended_use=DEMO_INTENDED_USE,
        synthetic_demo=True,
        preprocessing=recipe,
        classifier=network_spec(classifier, recipe, recipe, {}),
        segmenter=network_spec(segmenter, network_recipe(segmenter), recipe, {}),
        # A mask must cover 0.1 % of a synthetic image (262 px of 512 x 512) to count.
        thresholds=Thresholds(probability=0.5, mask=0.5, min_area_px=max(16, round(0.001 * image_size * image_size))),
    )
    out.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for spec in (manifest.classifier, manifest.segmenter):
            torch.save(build_network(spec, recipe).state_dict(), out / spec.weights_file)
    write_manifest(out, manifest)
    return load_bundle(out)


def is_current_demo_bundle(bundle: Bundle) -> bool:
    """Whether ``bundle`` was built by this version of the demo recipe (else it should be rebuilt)."""
    found = bundle.manifest
    classifier, segmenter = demo_presets()
    return (
        found.synthetic_demo
        and (found.name, found.version) == (DEMO_NAME, DEMO_VERSION)
        and found.preprocessing == network_recipe(classifier)
        and all(
            (spec.architecture, spec.encoder, spec.extra) == (preset.architecture, preset.encoder, preset.extra)
            for spec, preset in ((found.classifier, classifier), (found.segmenter, segmenter))
        )
    )


def _dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    both = predicted.sum() + truth.sum()
    return 1.0 if both == 0 else float(2.0 * np.logical_and(predicted, truth).sum() / both)


def build_demo_bundle(
    out_dir: Path,
    *,
    seed: int = 0,
    n_images: int = 400,
    epochs: int = 5,
    image_size: int = 512,
    device: str = "cpu",
    progress: bool = True,
) -> Bundle:
    """Generate a synthetic set, train the demo classifier and U-Net with ``pleura train``'s loop,
    write the bundle to ``out_dir`` and measure it on the held-out images.

    ``n_images`` synthetic images (half with a pneumothorax) of ``image_size`` pixels, split
    75 / 12.5 / 12.5 % into training, validation and held-out images. Weights are deterministic
    for a seed on a given device and torch build.
    """
    if image_size < 64:
        raise ValueError(f"build_demo_bundle: image_size must be at least 64, got {image_size}")
    if n_images < 10:
        raise ValueError(f"build_demo_bundle: n_images must be at least 10, got {n_images}")
    if epochs < 1:
        raise ValueError(f"build_demo_bundle: epochs must be at least 1, got {epochs}")
    out = Path(out_dir)
    presets = demo_presets(seed, epochs)
    console = Console(stderr=True, quiet=not progress)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with tempfile.TemporaryDirectory(prefix="pleura-demo-") as tmp:
        with Progress(*columns, console=console, disable=not progress) as bar:
            generating = bar.add_task("generating synthetic radiographs", total=n_images)
            root = write_siim_dataset(
                Path(tmp) / "data", n_images, size=image_size, seed=seed,
                on_image=lambda done: bar.update(generating, completed=done),
            )
        data = read_siim(root)
        examples = list(data.examples)
        assignment = make_splits(examples, DEMO_SPLIT, seed=seed)
        split_file = write_splits(Path(tmp) / "splits.csv", examples, assignment)
        result = train_in_turn(
            presets, data, Path(tmp) / "run", base=_untrained_base(Path(tmp) / "untrained", presets, image_size, seed),
            split_file=split_file, device=device, cache_root=Path(tmp) / "cache", name=DEMO_NAME,
            version=DEMO_VERSION, progress=progress, console=console,
        )
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(result.bundle.path, out)
        held_out = [example for example in examples if assignment[example.image_id] == "test"]
        counts = split_counts(examples, assignment)
        manifest = load_bundle(out).manifest.model_copy(deep=True)
        manifest.training_data = (
            f"{counts['train'][0]} synthetic chest radiographs from training.synthetic (seed {seed}; "
            f"{counts['train'][1]} with a synthetic pneumothorax), DX MONOCHROME2 12-bit, "
            f"{image_size}x{image_size} px, {counts['val'][0]} more to choose the best epoch; metrics on "
            f"{len(held_out)} held-out synthetic images. No patient data."
        )
        with Progress(*columns, console=console, disable=not progress) as bar:
            measuring = bar.add_task("measuring on held-out images", total=len(held_out))
            manifest.metrics.update(
                _held_out_metrics(out, manifest, held_out, torch.device(device), lambda: bar.advance(measuring))
            )
        write_manifest(out, manifest)
    return load_bundle(out)


def _held_out_metrics(
    bundle_dir: Path, manifest: Manifest, held_out: list[Example], device: torch.device, advance: Callable[[], None]
) -> dict[str, float]:
    """Classifier AUC/accuracy, U-Net Dice and the flag decision, through the worker's own path."""
    write_manifest(bundle_dir, manifest)
    models = load_models(load_bundle(bundle_dir), str(device))
    probabilities, flags, dices = [], [], []
    for start in range(0, len(held_out), BATCH_SIZE):
        batch = held_out[start : start + BATCH_SIZE]
        datasets = [pydicom.dcmread(example.path) for example in batch]
        images = [decode_radiograph(ds, manifest.preprocessing) for ds in datasets]
        findings = predict_images(models, images, datasets, batch_size=BATCH_SIZE)
        for example, ds, finding in zip(batch, datasets, findings):
            probabilities.append(finding.probability)
            flags.append(finding.flagged)
            if example.positive:
                truth = example.mask()
                dices.append(_dice(finding.mask, truth))
            advance()
    truth_labels = np.array([e.positive for e in held_out])
    predicted = np.array(probabilities)
    flagged = np.array(flags)
    metrics = {
        "heldout_images": float(len(held_out)),
        "heldout_positives": float(truth_labels.sum()),
        "classifier_accuracy": float(np.mean((predicted >= manifest.thresholds.probability) == truth_labels)),
    }
    # Only what the held-out split can measure: a manifest holds no NaN.
    if truth_labels.any() and (~truth_labels).any():
        auc = compute_roc_auc(torch.from_numpy(predicted), torch.from_numpy(truth_labels.astype(np.float32)))
        metrics["classifier_auc"] = float(auc)
    if dices:
        metrics["segmentation_dice"] = float(np.mean(dices))
    if truth_labels.any():
        metrics["flag_sensitivity"] = float(flagged[truth_labels].mean())
    if (~truth_labels).any():
        metrics["flag_specificity"] = float((~flagged[~truth_labels]).mean())
    return {key: round(value, 4) for key, value in metrics.items()}


def ensure_demo_bundle(target: Path, *, force: bool = False, seed: int = 0, progress: bool = True) -> tuple[Bundle, bool]:
    """The current demo bundle at ``target``, built when it is missing or outdated: (bundle, built).

    See :func:`ensure_bundle` for the locking and the swap.
    """
    return ensure_bundle(
        target,
        lambda staging: build_demo_bundle(staging, seed=seed, progress=progress),
        is_current_demo_bundle,
        force=force,
    )


def ensure_bundle(
    target: Path, build: Callable[[Path], Bundle], is_current: Callable[[Bundle], bool], *, force: bool = False
) -> tuple[Bundle, bool]:
    """The bundle at ``target`` when ``is_current`` says so, else ``build(staging)``: (bundle, built).

    Safe when several processes ask at once (set-up scripts, test sessions, checkouts sharing the
    user's data dir): one builds under an exclusive lock while the others wait and then find it
    current, and the build goes to a staging folder that replaces ``target`` only once it is
    complete, so nobody ever loads half a bundle. A trained (non-demo) bundle at ``target`` is never
    replaced unless ``force``; that raises :class:`BundleError`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            existing: Bundle | None = load_bundle(target)
        except BundleError:
            existing = None
        if existing is not None and not force:
            if is_current(existing):
                return existing, False
            if not existing.manifest.synthetic_demo:
                raise BundleError(f"{target} holds a trained model, not the demo: choose another folder or force")
        staging = target.parent / f".{target.name}.building"
        retired = target.parent / f".{target.name}.old"
        for leftover in (staging, retired):
            shutil.rmtree(leftover, ignore_errors=True)
        build(staging)
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return load_bundle(target), True
