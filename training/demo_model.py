"""Build the synthetic demo model bundle: small networks trained for a few minutes on generated images.

The demo bundle lets Pleura run end to end without patient data or downloaded weights. It goes
through the same contract as a real model: the images are written as DICOM in the SIIM-ACR layout,
indexed by :func:`~training.datasets.read_siim` (the reader of ``pleura train``), read back through
:func:`~contract.preprocess.decode_radiograph` and
:func:`~contract.preprocess.to_network_input`, the networks come from
:func:`~contract.networks.build_network`, and the held-out metrics are measured by loading the
written bundle and running :func:`~worker.inference.predict.predict_images`, exactly as the worker
does. The manifest says the model is a synthetic demo, and so does everything made with it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_roc_auc
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from contract.bundle import (
    DEMO_INTENDED_USE,
    MANIFEST_NAME,
    Bundle,
    BundleError,
    Manifest,
    NetworkSpec,
    Preprocessing,
    Thresholds,
    load_bundle,
    write_manifest,
)
from contract.networks import build_network, load_models
from contract.preprocess import decode_radiograph, to_network_input
from training.datasets import Example, read_siim
from training.synthetic import write_siim_dataset
from worker.inference.predict import predict_images

__all__ = ["DEMO_NAME", "DEMO_VERSION", "build_demo_bundle", "demo_manifest"]

DEMO_NAME = "pleura-demo"
DEMO_VERSION = "0.1.0-demo"
HELD_OUT_FRACTION = 0.2
BATCH_SIZE = 16


def demo_manifest(image_size: int = 512) -> Manifest:
    """The demo bundle's manifest before training: recipe, small networks, thresholds; no metrics yet."""
    return Manifest(
        name=DEMO_NAME,
        version=DEMO_VERSION,
        intended_use=DEMO_INTENDED_USE,
        synthetic_demo=True,
        preprocessing=Preprocessing(
            input_size=128, channels=1, voi="dicom", invert_monochrome1=True, clahe=False, normalisation="unit"
        ),
        # DenseNet-121's four dense blocks (6, 12, 24, 16 layers) with narrow layers, to train on a CPU.
        classifier=NetworkSpec(
            architecture="densenet121",
            weights_file="classifier.pt",
            extra={"init_features": 16, "growth_rate": 8, "block_config": [6, 12, 24, 16]},
        ),
        # A U-Net on a ResNet-34 encoder cut to three stages (at full depth it is too slow to train
        # on two CPU cores in minutes). The timm variant ("tu-") holds only the stages it uses, so
        # the weights file is ~6 MB instead of ~90 MB.
        segmenter=NetworkSpec(
            architecture="unet",
            encoder="tu-resnet34",
            weights_file="segmenter.pt",
            extra={"encoder_depth": 3, "decoder_channels": [64, 32, 16]},
        ),
        # A mask must cover 0.1 % of a synthetic image (262 px of 512 x 512) to count.
        thresholds=Thresholds(probability=0.5, mask=0.5, min_area_px=max(16, round(0.001 * image_size * image_size))),
    )


def is_current_demo_bundle(bundle: Bundle) -> bool:
    """Whether `bundle` was built by this version of the demo recipe (else it should be rebuilt)."""
    expected = demo_manifest()
    found = bundle.manifest
    return found.synthetic_demo and all(
        getattr(found, part) == getattr(expected, part)
        for part in ("name", "version", "preprocessing", "classifier", "segmenter", "thresholds")
    )


def _split(examples: list[Example], seed: int) -> tuple[list[Example], list[Example]]:
    """Train / held-out split, stratified by label, fixed by the seed."""
    rng = np.random.default_rng([seed, 3])
    train, held_out = [], []
    for label in (True, False):
        group = [e for e in examples if e.positive is label]
        order = rng.permutation(len(group))
        cut = max(1, int(round(len(group) * HELD_OUT_FRACTION))) if len(group) > 1 else 0
        held_out += [group[i] for i in order[:cut]]
        train += [group[i] for i in order[cut:]]
    return train, held_out


def _network_tensors(
    examples: list[Example], recipe: Preprocessing, advance: Callable[[], None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (N, C, S, S), masks on the network grid (N, 1, S, S) and labels (N,), via the worker's preprocessing."""
    size = recipe.input_size
    inputs = np.empty((len(examples), recipe.channels, size, size), dtype=np.float32)
    masks = np.empty((len(examples), 1, size, size), dtype=np.float32)
    for index, example in enumerate(examples):
        ds = pydicom.dcmread(example.path)
        inputs[index] = to_network_input(decode_radiograph(ds, recipe), recipe)
        mask = example.mask().astype(np.float32)
        grid = F.interpolate(torch.from_numpy(mask)[None, None], size=(size, size), mode="bilinear", antialias=True)
        masks[index, 0] = (grid[0, 0] >= 0.5).numpy()
        advance()
    labels = torch.tensor([float(e.positive) for e in examples])
    return torch.from_numpy(inputs), torch.from_numpy(masks), labels


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
    """Generate a synthetic set, train the demo classifier and U-Net, write and check the bundle.

    ``n_images`` synthetic images (half with a pneumothorax) of ``image_size`` pixels; 20 % are held
    out and measured through the worker's own inference path. Weights are deterministic for a seed
    on a given device and torch build. Takes about two minutes on two CPU cores with the defaults.
    """
    if image_size < 64:
        raise ValueError(f"build_demo_bundle: image_size must be at least 64, got {image_size}")
    if n_images < 10:
        raise ValueError(f"build_demo_bundle: n_images must be at least 10, got {n_images}")
    if epochs < 1:
        raise ValueError(f"build_demo_bundle: epochs must be at least 1, got {epochs}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # the bundle is incomplete until the new manifest is written
    manifest = demo_manifest(image_size)
    recipe = manifest.preprocessing
    target_device = torch.device(device)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar, tempfile.TemporaryDirectory(prefix="pleura-demo-") as tmp:
        generating = bar.add_task("generating synthetic radiographs", total=n_images)
        root = write_siim_dataset(
            Path(tmp), n_images, size=image_size, seed=seed, on_image=lambda done: bar.update(generating, completed=done)
        )
        train, held_out = _split(read_siim(root).examples, seed)

        reading = bar.add_task("preprocessing (worker recipe)", total=len(train))
        inputs, masks, labels = _network_tensors(train, recipe, lambda: bar.advance(reading))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = build_network(manifest.classifier, recipe).to(target_device)
            segmenter = build_network(manifest.segmenter, recipe).to(target_device)
            shuffler = torch.Generator().manual_seed(seed)
            steps_per_epoch = (len(train) + BATCH_SIZE - 1) // BATCH_SIZE
            training = bar.add_task("training classifier + U-Net", total=epochs * steps_per_epoch)
            _train(
                classifier, segmenter, inputs, masks, labels, epochs, shuffler, target_device,
                lambda: bar.advance(training),
            )

        for network, spec in ((classifier, manifest.classifier), (segmenter, manifest.segmenter)):
            state = {key: value.detach().cpu() for key, value in network.state_dict().items()}
            tmp_file = out / f".{spec.weights_file}.tmp"
            torch.save(state, tmp_file)
            os.replace(tmp_file, out / spec.weights_file)

        manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest.training_data = (
            f"{len(train)} synthetic chest radiographs from training.synthetic (seed {seed}; "
            f"{int(labels.sum())} with a synthetic pneumothorax), DX MONOCHROME2 12-bit, "
            f"{image_size}x{image_size} px; metrics on {len(held_out)} held-out synthetic images. "
            "No patient data."
        )
        measuring = bar.add_task("measuring on held-out images", total=len(held_out))
        manifest.metrics = _held_out_metrics(out, manifest, held_out, target_device, lambda: bar.advance(measuring))
        write_manifest(out, manifest)
    return load_bundle(out)


def _train(
    classifier: torch.nn.Module,
    segmenter: torch.nn.Module,
    inputs: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    shuffler: torch.Generator,
    device: torch.device,
    advance: Callable[[], None],
) -> None:
    """Both networks on the same shuffled batches: BCE for the classifier, Dice + BCE for the U-Net, Adam."""
    classification_loss = torch.nn.BCEWithLogitsLoss()
    segmentation_loss = DiceCELoss(sigmoid=True, batch=True)
    optimisers = [torch.optim.Adam(classifier.parameters(), lr=2e-3), torch.optim.Adam(segmenter.parameters(), lr=2e-3)]
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=2e-3, total_steps=epochs * ((len(inputs) + BATCH_SIZE - 1) // BATCH_SIZE), pct_start=0.2
        )
        for optimiser in optimisers
    ]
    classifier.train()
    segmenter.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=shuffler)
        for start in range(0, len(inputs), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            if len(index) < 2:  # BatchNorm needs more than one sample
                advance()
                continue
            x, y_mask, y = inputs[index].to(device), masks[index].to(device), labels[index].to(device)
            losses = [
                classification_loss(classifier(x)[:, 0], y),
                segmentation_loss(segmenter(x), y_mask),
            ]
            for optimiser, loss, scheduler in zip(optimisers, losses, schedulers):
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
            advance()
    classifier.eval()
    segmenter.eval()


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
