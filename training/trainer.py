"""The training loop behind ``pleura train``: one network from a preset, written as a model bundle.

A run trains the preset's network (a classifier or a U-Net) on the ``train`` split, measures it on
the ``val`` split after every epoch (MONAI metrics), keeps the best epoch by the preset's monitored
metric, stops early after ``patience`` epochs without improvement, and writes ``OUT/bundle``: the
best weights, and the other network of the bundle copied from a base bundle, so the result is a
complete bundle that ``pleura worker`` loads with no code change. The ``test`` split is not touched
(it is for ``pleura evaluate``).

``OUT`` holds the whole run::

    OUT/run.json           the preset with its overrides, the data, the device
    OUT/splits.csv         the patient-level split (reused on resume, or given with --split-file)
    OUT/metrics.csv        one row per epoch: losses, validation metrics, learning rate, images/s
    OUT/checkpoints/       last.pt (resume), best.pt (best weights so far)
    OUT/bundle/            the model bundle

Network construction (:func:`~contract.networks.build_network`) and preprocessing
(:mod:`contract.preprocess`) are the worker's own; training adds only augmentation
between resizing and normalisation.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from config.errors import PleuraError
from contract.bundle import (
    DEMO_INTENDED_USE,
    Bundle,
    Manifest,
    NetworkInput,
    NetworkSpec,
    Preprocessing,
    Thresholds,
    load_bundle,
    write_manifest,
)
from contract.networks import build_network, resolve_device
from contract.preprocess import normalise_input, resize_to_input
from training.augment import build_augmentation
from training.cache import build_cache
from training.datasets import DatasetIndex, Example, Problem
from training.epochs import (
    CachedDataset,
    EpochLoop,
    LoopState,
    loss_function,
    make_optimiser,
    make_scheduler,
)
from training.metrics import classifier_metrics
from training.presets import Preset, PresetError
from training.splits import make_splits, read_splits, split_counts, write_splits

__all__ = ["TrainingError", "TrainResult", "check_pair", "predict_network", "network_recipe", "train", "train_in_turn"]

RUN_FILE = "run.json"
SPLITS_FILE = "splits.csv"
CHECKPOINTS = "checkpoints"
BUNDLE_DIR = "bundle"
DEFAULT_INTENDED_USE = (
    "Research use: flags suspected pneumothorax on adult chest radiographs for worklist triage; trained with "
    "`pleura train` - validate on local data before any clinical use"
)
DECODING_FIELDS = ("voi", "invert_monochrome1")


class TrainingError(PleuraError, ValueError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class TrainResult:
    bundle: Bundle
    network: nn.Module
    """The best epoch's network, in eval mode on the training device."""
    recipe: Preprocessing
    """The network's full preprocessing recipe (decoding + its input grid)."""
    best_epoch: int
    best_metrics: dict[str, float]
    epochs_run: int
    stopped_early: bool
    problems: list[Problem] = field(default_factory=list)


def network_recipe(preset: Preset) -> Preprocessing:
    """The preprocessing a preset's network is trained with (and the worker will apply)."""
    return Preprocessing(
        input_size=preset.input_size,
        channels=preset.channels,
        voi="dicom",
        invert_monochrome1=True,
        clahe=preset.clahe,
        clahe_clip_limit=preset.clahe_clip_limit,
        normalisation=preset.normalisation,
        hu_window=preset.hu_window,  # CT presets only (the HU window decides, not the VOI)
    )


def network_spec(preset: Preset, recipe: Preprocessing, shared: Preprocessing, training: dict) -> NetworkSpec:
    """The manifest entry of ``preset``'s network; its own input grid when ``recipe`` differs from
    the bundle's ``shared`` preprocessing."""
    own = None
    grid = ("input_size", "channels", "normalisation", "mean", "std", "clahe", "clahe_clip_limit")
    if any(getattr(recipe, name) != getattr(shared, name) for name in grid):
        own = NetworkInput(
            input_size=recipe.input_size,
            channels=recipe.channels,
            normalisation=recipe.normalisation,
            mean=recipe.mean,
            std=recipe.std,
            clahe=recipe.clahe,
            clahe_clip_limit=recipe.clahe_clip_limit,
        )
    return NetworkSpec(
        architecture=preset.architecture,
        encoder=preset.encoder,
        weights_file=f"{preset.network_role}.pt",
        extra=dict(preset.extra),
        input=own,
        training=training,
    )


def predict_network(
    network: nn.Module, images: Sequence[np.ndarray], recipe: Preprocessing, device: torch.device | str = "cpu"
) -> np.ndarray:
    """The training code's own prediction on decoded images: probabilities, (N,) for a classifier,
    (N, S, S) on the network grid for a U-Net. ``images`` come from the recipe's decoding."""
    batch = torch.from_numpy(np.stack([resize_to_input(image, recipe) for image in images]))[:, None]
    network.eval()
    with torch.inference_mode():
        output = torch.sigmoid(network(normalise_input(batch, recipe).to(device))).float().cpu()
    return output[:, 0].numpy() if output.ndim == 4 else output.reshape(len(images), -1)[:, 0].numpy()


def _describe_data(data: DatasetIndex, counts: dict[str, tuple[int, int]], used: Sequence[Example]) -> str:
    parts = ", ".join(f"{name} {n} ({p} positive)" for name, (n, p) in counts.items())
    kinds = {
        "siim": "SIIM-ACR layout",
        "cxr14": "ChestX-ray14 layout",
        "archive": "Pleura's archive labelled by radiologists' feedback",
    }
    synthetic = sum(example.synthetic for example in used)
    note = ""
    if synthetic == len(used):
        note = "; synthetic images from training.synthetic, no patient data"
    elif synthetic:
        note = f"; {synthetic} of the {len(used)} training and validation images are synthetic (training.synthetic)"
    sources = data.parts if data.kind == "merged" else [data]
    where = " + ".join(f"{kinds[part.kind]} at {part.root} (labels {part.label_file.name})" for part in sources)
    return f"{where}: {parts}{note}"


def _is_synthetic(examples: Sequence[Example]) -> bool:
    """Whether any image was made by Pleura's synthetic generator (its header says so)."""
    return any(example.synthetic for example in examples)


def train(
    preset: Preset,
    data: DatasetIndex,
    out: Path | str,
    *,
    base: Bundle | None,
    split_file: Path | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    device: str = "auto",
    resume: bool = False,
    cache_root: Path | None = None,
    skip_bad: bool = False,
    name: str | None = None,
    version: str | None = None,
    intended_use: str | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> TrainResult:
    """Train ``preset`` on ``data`` into ``out`` and write ``out/bundle`` (see the module docstring).

    ``base`` supplies the bundle's other network (and its shared decoding recipe, which the preset
    must match); without one the run stops before training.
    """
    console = console or Console(stderr=True, quiet=not progress)
    out_dir = Path(out)
    checkpoints = out_dir / CHECKPOINTS
    last_file, best_file = checkpoints / "last.pt", checkpoints / "best.pt"
    if last_file.exists() and not resume:
        raise TrainingError(
            f"{out_dir} already holds a run ({last_file}); use --resume to continue it or another --out"
        )
    if resume and not last_file.exists():
        raise TrainingError(f"nothing to resume in {out_dir}: {last_file} is missing")
    if preset.kind == "ct":
        raise TrainingError(f"preset {preset.name} is a CT preset: it trains on CT series (training.ct_trainer)")
    if preset.task == "segment" and not data.has_masks:
        raise TrainingError(f"preset {preset.name} trains a U-Net and needs masks; {data.kind} data has none")
    if base is None:
        raise TrainingError(
            f"a bundle holds a classifier and a U-Net; preset {preset.name} trains the {preset.network_role} only: "
            "give --base BUNDLE for the other network"
        )
    recipe = network_recipe(preset)
    shared = base.manifest.preprocessing
    for name_ in DECODING_FIELDS:
        if getattr(shared, name_) != getattr(recipe, name_):
            raise TrainingError(
                f"base bundle {base.path} decodes with {name_}={getattr(shared, name_)}; "
                f"the preset uses {getattr(recipe, name_)}"
            )
    if shared.clahe and not recipe.clahe:
        raise TrainingError(f"base bundle {base.path} applies CLAHE to both networks; set --clahe for this one too")

    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(exist_ok=True)
    run_record = {
        "preset": preset.model_dump(mode="json"),
        "data": str(data.root),
        "labels": str(data.label_file),
        "base": str(base.path),
    }
    run_path = out_dir / RUN_FILE
    if resume and run_path.exists():
        previous = json.loads(run_path.read_text())
        before = {k: v for k, v in previous["preset"].items() if k != "epochs"}
        now = {k: v for k, v in run_record["preset"].items() if k != "epochs"}
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise TrainingError(
                f"--resume: the run in {out_dir} was started with other settings ({', '.join(changed)})"
            )
    run_path.write_text(json.dumps(run_record, indent=2) + "\n")

    # Splits: given, kept from an earlier run, or made now and written.
    examples = list(data.examples)
    split_path = Path(split_file) if split_file is not None else out_dir / SPLITS_FILE
    if split_path.exists():
        assignment = read_splits(split_path, examples)
    else:
        assignment = make_splits(examples, fractions, seed=preset.seed)
        write_splits(split_path, examples, assignment)
    counts = split_counts(examples, assignment)
    train_examples = [e for e in examples if assignment[e.image_id] == "train"]
    val_examples = [e for e in examples if assignment[e.image_id] == "val"]
    if preset.positives_only:
        train_examples = [e for e in train_examples if e.positive]
        val_examples = [e for e in val_examples if e.positive]
    if len(train_examples) < 2 or not val_examples:
        raise TrainingError(
            f"too few images: {len(train_examples)} to train on and {len(val_examples)} to validate with "
            f"(split {split_path}{', positives only' if preset.positives_only else ''})"
        )

    target = resolve_device(device)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not progress) as bar:
        caches = []
        for label, subset in (("train", train_examples), ("val", val_examples)):
            task = bar.add_task(f"caching {label} images at {recipe.input_size} px", total=len(subset))
            caches.append(
                build_cache(
                    subset,
                    recipe,
                    with_masks=preset.task == "segment",
                    cache_root=cache_root,
                    skip_bad=skip_bad,
                    on_image=lambda done, total, task=task: bar.update(task, completed=done),
                )
            )
            bar.update(task, visible=False)
        train_cache, val_cache = caches
        problems = train_cache.problems + val_cache.problems
        for problem in problems:
            console.print(f"[yellow]skipped[/] {problem}")

        positives = int(train_cache.labels.sum())
        negatives = len(train_cache) - positives
        positive_weight = None
        if preset.imbalance == "weight" and positives and negatives:
            positive_weight = negatives / positives

        torch.manual_seed(preset.seed)
        network = build_network(
            network_spec(preset, recipe, shared, {}),
            recipe,
            encoder_weights=None if preset.encoder_weights == "none" else preset.encoder_weights,
        ).to(target)
        loss = loss_function(preset, positive_weight)
        amp = preset.amp and target.type == "cuda"
        with_mask = preset.task == "segment"
        val_loader = DataLoader(CachedDataset(val_cache, range(len(val_cache)), None), batch_size=preset.batch_size)
        drop_last = len(train_cache) > preset.batch_size  # a last batch of one would break BatchNorm
        steps_per_epoch = len(train_cache) // preset.batch_size if drop_last else 1
        if preset.steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, preset.steps_per_epoch)

        def epoch_loader(epoch_seed: int) -> DataLoader:
            generator = torch.Generator().manual_seed(epoch_seed)
            transform = build_augmentation(preset.augment, preset.input_size, with_mask, seed=epoch_seed % 2**32)
            train_set = CachedDataset(train_cache, range(len(train_cache)), transform)
            if preset.imbalance == "sample" and positives and negatives:
                weights = np.where(train_cache.labels, 0.5 / positives, 0.5 / negatives)
                sampler = WeightedRandomSampler(
                    weights.tolist(), len(train_cache), replacement=True, generator=generator
                )
            else:
                sampler = RandomSampler(train_set, generator=generator)
            return DataLoader(train_set, batch_size=preset.batch_size, sampler=sampler, drop_last=drop_last)

        optimiser = make_optimiser(preset, network)
        loop = EpochLoop(
            preset, network, optimiser, loss, recipe, target,
            loader=epoch_loader,
            validate=lambda net: _validate(net, val_loader, loss, recipe, preset, target, amp),
            truth=lambda masks, labels: masks if with_mask else labels,
            steps_per_epoch=steps_per_epoch, out_dir=out_dir, best_file=best_file, console=console,
            scheduler=make_scheduler(preset, optimiser), amp=amp, last_file=last_file, record_lr=True,
            on_epoch_start=lambda: bar.reset(steps_task, total=steps_per_epoch),
            on_step=lambda: bar.advance(steps_task),
            on_epoch_end=lambda: bar.advance(epochs_task),
        )
        start_epoch, state = 1, LoopState()
        if resume:
            start_epoch, state = loop.resume(last_file)
            console.print(f"resuming {out_dir} after epoch {state.epoch} (best so far: epoch {state.best_epoch})")
        epochs_task = bar.add_task(f"{preset.name}: epochs", total=preset.epochs, completed=start_epoch - 1)
        steps_task = bar.add_task("  batches", total=steps_per_epoch)
        state = loop.run(start_epoch, state)

    loop.load_best()
    best_epoch, best_metrics, epoch, stopped_early = state.best_epoch, state.best_metrics, state.epoch, state.stopped_early
    synthetic = _is_synthetic(train_examples + val_examples)
    training_record = {
        "preset": preset.name,
        "source": preset.source,
        "hyperparameters": preset.model_dump(mode="json", exclude={"name", "source"}),
        "data": _describe_data(data, counts, train_examples + val_examples),
        "split_file": str(split_path),
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "device": str(target),
        "validation": {k: round(v, 4) for k, v in best_metrics.items() if k.startswith("val_") and math.isfinite(v)},
        "skipped_images": len(problems),
        "synthetic": synthetic,
    }
    bundle = _write_bundle(
        out_dir / BUNDLE_DIR, preset, recipe, base, best_file, training_record, synthetic, name, version, intended_use
    )
    console.print(f"[green]bundle written[/] {bundle.path}: {bundle.identity.label} (best epoch {best_epoch})")
    return TrainResult(bundle, network, recipe, best_epoch, best_metrics, epoch, stopped_early, problems)


def _validate(
    network: nn.Module,
    loader: DataLoader,
    loss_function,
    recipe: Preprocessing,
    preset: Preset,
    device: torch.device,
    amp: bool,
) -> dict[str, float]:
    network.eval()
    losses, count = 0.0, 0
    probabilities, labels_all = [], []
    dice, iou = (
        DiceMetric(include_background=True, ignore_empty=False),
        MeanIoU(include_background=True, ignore_empty=False),
    )
    with torch.inference_mode():
        for images, masks, labels in loader:
            inputs = normalise_input(images, recipe).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                output = network(inputs).float()
            if preset.task == "segment":
                truth = masks.to(device)
                losses += float(loss_function(output, truth)) * len(images)
                predicted = (torch.sigmoid(output) >= preset.mask_threshold).float()
                dice(predicted, truth)
                iou(predicted, truth)
            else:
                losses += float(loss_function(output, labels.to(device))) * len(images)
                probabilities.append(torch.sigmoid(output[:, 0]).cpu())
                labels_all.append(labels)
            count += len(images)
    metrics = {"val_loss": losses / max(count, 1)}
    if preset.task == "segment":
        metrics["val_dice"] = float(dice.aggregate().item())
        metrics["val_iou"] = float(iou.aggregate().item())
    else:
        found = classifier_metrics(torch.cat(probabilities), torch.cat(labels_all), preset.probability_threshold)
        metrics.update({f"val_{k}": v for k, v in found.items()})
    return metrics


def _write_bundle(
    target: Path,
    preset: Preset,
    recipe: Preprocessing,
    base: Bundle,
    best_file: Path,
    training_record: dict,
    synthetic: bool,
    name: str | None,
    version: str | None,
    intended_use: str | None,
) -> Bundle:
    """The trained network plus the base bundle's other network, with one manifest."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shared = base.manifest.preprocessing
    role = preset.network_role
    spec = network_spec(preset, recipe, shared, training_record)
    shutil.copyfile(best_file, target / spec.weights_file)
    other_role = "segmenter" if role == "classifier" else "classifier"
    other = getattr(base.manifest, other_role).model_copy(deep=True)
    other_file = other.weights_file if other.weights_file != spec.weights_file else f"base-{other.weights_file}"
    shutil.copyfile(base.weights_path(other), target / other_file)
    other.weights_file = other_file
    if "synthetic" not in other.training:  # a network not made by `pleura train` (e.g. the demo's)
        other.training = {
            **other.training,
            "from_bundle": f"{base.manifest.name} {base.manifest.version}",
            "data": base.manifest.training_data,
            "synthetic": base.manifest.synthetic_demo,
        }
    # A bundle is a synthetic demo as long as either of its networks learnt from synthetic data.
    part_synthetic = bool(synthetic or other.training["synthetic"])
    thresholds = base.manifest.thresholds.model_copy()
    if role == "classifier":
        thresholds.probability = preset.probability_threshold
    else:
        thresholds.mask = preset.mask_threshold
    if preset.min_area_px is not None:
        thresholds.min_area_px = preset.min_area_px
    metrics = {f"{role}_{k}": round(v, 4) for k, v in training_record["validation"].items()}
    metrics.update({k: v for k, v in base.manifest.metrics.items() if k.startswith(other_role)})
    created = datetime.now(timezone.utc)
    data_note = (
        f"{role}: {training_record['data']}. {other_role}: from bundle {base.manifest.name} "
        f"{base.manifest.version} ({base.manifest.training_data})"
    )
    manifest = Manifest(
        name=name or f"pleura-{preset.name}",
        version=version or created.strftime("%Y%m%d.%H%M%S"),
        intended_use=DEMO_INTENDED_USE if part_synthetic else (intended_use or DEFAULT_INTENDED_USE),
        synthetic_demo=part_synthetic,
        created=created.isoformat(timespec="seconds"),
        preprocessing=shared,
        classifier=spec if role == "classifier" else other,
        segmenter=spec if role == "segmenter" else other,
        thresholds=Thresholds.model_validate(thresholds.model_dump()),
        training_data=data_note,
        metrics=metrics,
    )
    write_manifest(target, manifest)
    return load_bundle(target)


def check_pair(presets: Sequence[Preset]) -> None:
    """One preset, or one classifier and one U-Net preset (:func:`train_in_turn`); else PresetError."""
    if len(presets) > 2 or (len(presets) == 2 and {p.task for p in presets} != {"classify", "segment"}):
        raise PresetError("give one preset, or one classifier and one U-Net preset")


def train_in_turn(
    presets: Sequence[Preset],
    data: DatasetIndex,
    out: Path,
    *,
    base: Bundle,
    split_file: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    **options,
) -> TrainResult:
    """``pleura train`` with one preset (in ``out``) or a classifier and a U-Net preset, trained in
    turn on the same split, each in ``out/<preset>``: the second takes the first one's bundle as its
    base, so its bundle holds both networks. ``options`` go to :func:`train` for every stage."""
    check_pair(presets)
    console = console or Console(stderr=True)
    current_base, current_split = base, split_file
    result = None
    for preset in presets:
        run_dir = out if len(presets) == 1 else out / preset.name
        other = "segmenter" if preset.task == "classify" else "classifier"
        source = f"{current_base.path} ({current_base.identity.label})"
        console.print(f"training the {preset.network_role} of {preset.name} in {run_dir}; the {other} comes from {source}")
        stage_resume = resume and (len(presets) == 1 or (run_dir / CHECKPOINTS / "last.pt").exists())
        result = train(preset, data, run_dir, base=current_base, split_file=current_split, resume=stage_resume,
                       console=console, **options)
        current_base = result.bundle
        current_split = current_split or run_dir / SPLITS_FILE
    if result is None:
        raise PresetError("give one preset, or one classifier and one U-Net preset")
    return result
