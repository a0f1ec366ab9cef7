"""Evaluation of a model bundle on a held-out split: what ``pleura evaluate`` computes.

Every image goes through the worker's own path: decoded with the bundle's recipe
(:func:`training.cache.decode_example`, i.e. :func:`~contract.preprocess.decode_radiograph`
for DICOM), both networks run by :func:`~worker.inference.predict.network_outputs`, the U-Net map
taken to the source grid by :func:`~contract.preprocess.mask_to_source`, and the decision
taken by :func:`~contract.decision.lesion_mask` and
:func:`~contract.decision.flag_decision`. So the numbers describe what the node decides.

The networks run once; what each image contributes to every metric is kept as pixel counts per
mask threshold (:class:`ImageStatistics`), so :mod:`training.tune` sweeps thresholds without
running the networks again.

The **SIIM-ACR leaderboard metric**: the predicted and the true mask of each image are resized to
1024x1024 by nearest neighbour; the image's Dice is 2|P∩T| / (|P|+|T|), 1 when both are empty (0
when only one is); the metric is the mean over all images. The prediction is the node's decision:
the U-Net mask when the image is flagged, an empty mask when it is not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.errors import InvalidDicomError

from config.errors import PleuraError
from contract.bundle import Bundle, Preprocessing, Thresholds
from contract.decision import flag_decision, lesion_mask, source_lesion_mask
from contract.networks import LoadedModels
from contract.preprocess import ImageDecodeError, mask_to_source, network_inputs
from training.cache import decode_example
from training.datasets import DatasetError, DatasetIndex, Example, Problem
from training.metrics import (
    AUC_CI_METHOD,
    LEADERBOARD_METHOD,
    auc_confidence_interval,
    binary_metrics,
    dice_from_counts,
    finite_mean,
    leaderboard_weights,
)
from training.rle import rle_encode
from training.splits import read_splits
from worker.inference.predict import network_outputs

__all__ = [
    "Evaluation",
    "EvaluationError",
    "HeldOut",
    "ImageStatistics",
    "Resources",
    "collect_statistics",
    "decide",
    "evaluate_bundle",
    "held_out_examples",
    "summarise",
]


class EvaluationError(PleuraError, ValueError):
    """An evaluation that cannot run; the message says why and what to do."""


# --- the held-out split -------------------------------------------------------------------------


@dataclass
class HeldOut:
    """The images evaluated and where the choice came from."""

    examples: list[Example]
    split: str
    """``test``, ``val`` or ``all`` (no split file)."""
    split_file: Path | None
    note: str
    """One sentence for the console and the report."""


def recorded_split_files(bundle: Bundle) -> list[Path]:
    """The split files the bundle's networks were trained with (``pleura train`` records them)."""
    found: list[Path] = []
    for spec in bundle.manifest.networks:
        recorded = spec.training.get("split_file")
        if recorded and Path(recorded) not in found:
            found.append(Path(recorded))
    return found


def held_out_examples(data: DatasetIndex, bundle: Bundle, split: str, split_file: Path | None = None) -> HeldOut:
    """The ``split`` images of ``data``: from ``split_file``; else from the split file recorded with
    the bundle (or the ``splits.csv`` of the run folder it sits in) when it exists and fits the data
    set; else the whole data set, and the note says so."""
    examples = list(data.examples)
    if split_file is not None:
        assignment = read_splits(split_file, examples)  # a given file that does not fit stops
        chosen_file, note = Path(split_file), f"the {split} split of {split_file}"
    else:
        assignment, chosen_file, reasons = None, None, []
        trained_with = recorded_split_files(bundle)
        beside = bundle.path.parent / "splits.csv"
        candidates = trained_with + ([beside] if beside.is_file() and beside not in trained_with else [])
        for candidate in candidates:
            if not candidate.is_file():
                reasons.append(f"{candidate} (recorded with the bundle) is missing")
                continue
            try:
                assignment = read_splits(candidate, examples)
            except DatasetError as exc:
                reasons.append(f"{candidate} (the bundle's training split) does not fit this data set: {exc}")
                continue
            chosen_file = candidate
            break
        if assignment is None:
            why = "; ".join(reasons) if reasons else "no --split-file given and none recorded with the bundle"
            return HeldOut(
                examples,
                "all",
                None,
                f"evaluating on the WHOLE data set ({why}); images the model was trained or tuned on make "
                "the numbers look better than they are",
            )
        note = f"the {split} split of {chosen_file} (recorded with the bundle's training run)"
        if len(trained_with) > 1:
            note += f"; the bundle's networks were trained with different split files ({', '.join(map(str, trained_with))})"
    chosen = [example for example in examples if assignment[example.image_id] == split]
    if not chosen:
        raise EvaluationError(f"{chosen_file}: the {split} split has no image of this data set")
    return HeldOut(chosen, split, chosen_file, note)


# --- the leaderboard grid -----------------------------------------------------------------------


# --- one pass of the networks -------------------------------------------------------------------


@dataclass
class Resources:
    """Inference time and memory, on the device the evaluation ran on."""

    device: str
    images: int
    seconds_per_image: float
    """The node's path per image: read and decode, preprocess, both networks, mask and decision."""
    peak_memory_mb: float
    networks: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per network: ms_per_image, peak_mb, weights_mb (see :func:`profile_networks`)."""
    memory_method: str = ""


class _PeakMemory:
    """Peak memory over a block: CUDA's allocator peak, or on the CPU the process's resident-set
    high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` where Linux allows it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda"

    @staticmethod
    def _status_kb(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return float(line.split()[1])
        except OSError:
            return None
        return None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "CUDA: torch.cuda.max_memory_allocated() (weights, inputs and activations on the GPU)"
        if not self.resettable:
            return "CPU: not measured (/proc/self/clear_refs cannot reset the resident-set high-water mark here)"
        return (
            "CPU: growth of the process's resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) "
            "over its size before the block, plus the networks' weights; approximate, and it includes what Python "
            "holds"
        )

    def __enter__(self) -> _PeakMemory:
        self.peak_mb = float("nan")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.resettable = True
        except OSError:  # without the reset, VmHWM is the whole process's past peak: no measure
            self.resettable = False
        self.base_kb = self._status_kb("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        high = self._status_kb("VmHWM")
        if self.resettable and high is not None and self.base_kb is not None:
            self.peak_mb = max(high - self.base_kb, 0.0) / 1024


def _weights_mb(network: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()]) / 2**20


def profile_networks(
    models: LoadedModels, images: Sequence[np.ndarray], repeats: int = 1
) -> dict[str, dict[str, float]]:
    """Each network alone on a batch of decoded images: ms per image (mean of ``repeats`` forward
    passes) and peak memory (CUDA: allocator peak; CPU: weights + RSS peak growth).

    Called after the evaluation's own pass, which has warmed the networks up (lazy initialisation,
    allocator caches) on batches of the same size.
    """
    decoded_with = models.manifest.preprocessing
    profile: dict[str, dict[str, float]] = {}
    for role, network, recipe in (
        ("classifier", models.classifier, models.classifier_preprocessing),
        ("segmenter", models.segmenter, models.segmenter_preprocessing),
    ):
        if network is None:  # a classifier-only bundle
            continue
        batch = torch.from_numpy(network_inputs(images, decoded_with, recipe)).to(models.device)
        with torch.inference_mode(), _PeakMemory(models.device) as memory:
            started = time.perf_counter()
            for _ in range(repeats):
                network(batch)
            if models.device.type == "cuda":
                torch.cuda.synchronize(models.device)
            seconds = time.perf_counter() - started
        weights = _weights_mb(network)
        peak = memory.peak_mb if models.device.type == "cuda" else memory.peak_mb + weights
        profile[role] = {
            "ms_per_image": 1000.0 * seconds / (repeats * len(images)),
            "peak_mb": peak,
            "weights_mb": weights,
        }
    return profile


def _decode(example: Example, recipe: Preprocessing) -> np.ndarray:
    """The worker's decoding of one image; a file that will not decode stops with its name and row."""
    try:
        return decode_example(example, recipe)
    except (ImageDecodeError, InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        problem = Problem(example.path, example.rows[0] if example.rows else None, f"cannot decode the image: {exc}")
        raise DatasetError(
            f"{problem} (`pleura dataset check --decode` lists every such image; fix it or remove its row)"
        ) from None


@dataclass
class ImageStatistics:
    """What each evaluated image contributes to the metrics, per U-Net mask threshold.

    Pixel counts are on the source grid (``*_px``) and on the 1024x1024 leaderboard grid
    (``*_1024``); ``area_px`` is the U-Net mask's area, what the minimum-area rule compares.
    """

    examples: list[Example]
    labels: np.ndarray
    probabilities: np.ndarray
    mask_thresholds: np.ndarray
    area_px: np.ndarray
    """(N, T) U-Net mask area, source pixels."""
    intersection_px: np.ndarray
    truth_px: np.ndarray
    """(N,)"""
    predicted_1024: np.ndarray
    intersection_1024: np.ndarray
    truth_1024: np.ndarray
    has_masks: bool
    resources: Resources
    shapes: list[tuple[int, int]] = field(default_factory=list)
    """Each image's (Rows, Columns)."""
    unet_rles: dict[float, list[str]] = field(default_factory=dict)
    """Mask threshold -> the U-Net mask of each image as SIIM RLE (for the predictions file)."""
    classifier_only: bool = False
    """The bundle has no U-Net: classification metrics only (``has_masks`` is then False), and the
    decision is the probability threshold alone."""

    def threshold_index(self, mask_threshold: float) -> int:
        found = np.flatnonzero(np.isclose(self.mask_thresholds, mask_threshold))
        if not len(found):
            raise ValueError(f"mask threshold {mask_threshold} was not computed ({self.mask_thresholds.tolist()})")
        return int(found[0])


def collect_statistics(
    models: LoadedModels,
    examples: Sequence[Example],
    mask_thresholds: Sequence[float],
    *,
    with_masks: bool,
    batch_size: int = 8,
    rle_thresholds: Sequence[float] = (),
    profile_images: int = 8,
    on_images: Callable[[int], None] | None = None,
) -> ImageStatistics:
    """Run the networks once over ``examples`` (the worker's decoding and networks) and count, per
    mask threshold, what the metrics need. ``with_masks``: the data set has true masks. Then each
    network alone is timed on the first ``profile_images`` images (none: no per-network profile)."""
    thresholds = np.asarray(sorted(set(float(t) for t in mask_thresholds)), dtype=np.float64)
    n, t_count = len(examples), len(thresholds)
    area = np.zeros((n, t_count), np.int64)
    inter_px = np.zeros((n, t_count), np.int64)
    pred_1024 = np.zeros((n, t_count), np.float64)
    inter_1024 = np.zeros((n, t_count), np.float64)
    truth_px, truth_1024 = np.zeros(n, np.int64), np.zeros(n, np.float64)
    probabilities = np.zeros(n, np.float64)
    rles: dict[float, list[str]] = {float(t): [] for t in rle_thresholds}
    recipe = models.manifest.preprocessing
    node_seconds = 0.0
    sample: list[np.ndarray] = []
    shapes: list[tuple[int, int]] = []
    with _PeakMemory(models.device) as memory:
        for start in range(0, n, batch_size):
            batch = examples[start : start + batch_size]
            began = time.perf_counter()
            images = [_decode(example, recipe) for example in batch]
            batch_probabilities, maps = network_outputs(models, images)
            node_seconds += time.perf_counter() - began
            if len(sample) < profile_images:
                sample.extend(images[: profile_images - len(sample)])
            for offset, (example, image) in enumerate(zip(batch, images)):
                index = start + offset
                shapes.append((int(image.shape[0]), int(image.shape[1])))
                probabilities[index] = float(batch_probabilities[offset])
                began = time.perf_counter()
                source_map = mask_to_source(maps[offset], image.shape)
                node_seconds += time.perf_counter() - began
                rows, columns = leaderboard_weights(image.shape)
                truth = example.mask() if with_masks else np.zeros(image.shape, bool)
                if truth.shape != image.shape:
                    raise DatasetError(
                        f"{example.path}: pixel data is {image.shape[0]}x{image.shape[1]}, the mask "
                        f"{truth.shape[0]}x{truth.shape[1]}"
                    )
                truth_px[index] = int(truth.sum())
                truth_1024[index] = rows @ truth @ columns
                for k, threshold in enumerate(thresholds):
                    mask = lesion_mask(source_map, threshold)
                    overlap = mask & truth
                    area[index, k] = int(mask.sum())
                    inter_px[index, k] = int(overlap.sum())
                    pred_1024[index, k] = rows @ mask @ columns
                    inter_1024[index, k] = rows @ overlap @ columns
                for threshold, encoded in rles.items():
                    encoded.append(rle_encode(lesion_mask(source_map, threshold)))
            if on_images is not None:
                on_images(min(start + batch_size, n))
    weights = 0.0 if models.device.type == "cuda" else _weights_mb(models.classifier) + (
        _weights_mb(models.segmenter) if models.segmenter is not None else 0.0
    )
    resources = Resources(
        device=str(models.device),
        images=n,
        seconds_per_image=node_seconds / max(n, 1),
        peak_memory_mb=memory.peak_mb + weights,
        networks=profile_networks(models, sample) if sample else {},
        memory_method=memory.method,
    )
    return ImageStatistics(
        examples=list(examples),
        labels=np.asarray([example.positive for example in examples], dtype=bool),
        probabilities=probabilities,
        mask_thresholds=thresholds,
        area_px=area,
        intersection_px=inter_px,
        truth_px=truth_px,
        predicted_1024=pred_1024,
        intersection_1024=inter_1024,
        truth_1024=truth_1024,
        # Segmentation metrics and the leaderboard need true masks and a U-Net that drew some.
        has_masks=with_masks and models.segmenter is not None,
        classifier_only=models.segmenter is None,
        resources=resources,
        unet_rles=rles,
        shapes=shapes,
    )


# --- metrics ------------------------------------------------------------------------------------


@dataclass
class Decision:
    """Per image, at one triplet of thresholds."""

    flagged: np.ndarray
    unet_dice: np.ndarray
    """Dice of the U-Net mask on the source grid (classifier ignored); NaN for images without a true mask."""
    leaderboard: np.ndarray
    """SIIM-ACR per-image Dice of the decision at 1024x1024; NaN when the data set has no masks."""


def decide(stats: ImageStatistics, thresholds: Thresholds) -> Decision:
    """The node's decision for every image at ``thresholds`` (the worker's rule), and its Dice."""
    k = stats.threshold_index(thresholds.mask)
    min_area = 0 if stats.classifier_only else thresholds.min_area_px  # contract.decision.min_area_px
    flagged = flag_decision(stats.probabilities, stats.area_px[:, k], thresholds.probability, min_area)
    if not stats.has_masks:
        nan = np.full(len(flagged), np.nan)
        return Decision(flagged, nan, nan)
    unet = dice_from_counts(stats.intersection_px[:, k], stats.area_px[:, k], stats.truth_px)
    unet = np.where(stats.truth_px > 0, unet, np.nan)
    board = np.where(
        flagged,
        dice_from_counts(stats.intersection_1024[:, k], stats.predicted_1024[:, k], stats.truth_1024),
        (stats.truth_1024 == 0).astype(np.float64),  # nothing predicted: 1 when there is nothing to find
    )
    return Decision(flagged, unet, board)


def summarise(stats: ImageStatistics, thresholds: Thresholds, decision: Decision | None = None) -> dict[str, Any]:
    """The metrics of ``pleura evaluate`` at ``thresholds``: classification, segmentation, decision."""
    from sklearn.metrics import roc_auc_score

    decision = decision or decide(stats, thresholds)
    labels = stats.labels
    classification = binary_metrics(stats.probabilities, labels, thresholds.probability)
    both_classes = bool(labels.any() and (~labels).any())
    classification["auc"] = float(roc_auc_score(labels, stats.probabilities)) if both_classes else None
    classification["auc_ci95"] = auc_confidence_interval(labels, stats.probabilities) if both_classes else None

    decided = binary_metrics(decision.flagged.astype(np.float64), labels, 0.5)
    segmentation: dict[str, Any] = {"positives": int(labels.sum()), "available": stats.has_masks}
    if stats.has_masks:
        k = stats.threshold_index(thresholds.mask)
        positive = stats.truth_px > 0
        inter, pred, truth = stats.intersection_px[positive, k], stats.area_px[positive, k], stats.truth_px[positive]
        union = pred + truth - inter
        segmentation.update(
            dice=finite_mean(decision.unet_dice),
            dice_median=float(np.nanmedian(decision.unet_dice)) if positive.any() else None,
            iou=finite_mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)) if positive.any() else None,
            leaderboard_unet_only=finite_mean(
                dice_from_counts(stats.intersection_1024[:, k], stats.predicted_1024[:, k], stats.truth_1024)
            ),
        )
        decided["leaderboard"] = finite_mean(decision.leaderboard)
    else:
        decided["leaderboard"] = None
    resources = stats.resources
    return {
        "images": len(labels),
        "positives": int(labels.sum()),
        "thresholds": thresholds.model_dump(),
        "classification": classification,
        "segmentation": segmentation,
        "decision": decided,
        "resources": {
            "device": resources.device,
            "seconds_per_image": resources.seconds_per_image,
            "peak_memory_mb": resources.peak_memory_mb,
            "networks": resources.networks,
        },
        "methods": {"auc_ci": AUC_CI_METHOD, "leaderboard": LEADERBOARD_METHOD, "memory": resources.memory_method},
    }


# --- the whole evaluation -----------------------------------------------------------------------


@dataclass
class Case:
    """An image shown in the report, with its outlines."""

    group: str
    example: Example
    image: np.ndarray
    truth: np.ndarray | None
    unet_mask: np.ndarray
    flagged: bool
    probability: float
    area_px: int
    dice: float | None


@dataclass
class Evaluation:
    bundle: Bundle
    data: DatasetIndex
    held_out: HeldOut
    stats: ImageStatistics
    thresholds: Thresholds
    decision: Decision
    metrics: dict[str, Any]
    cases: list[Case] = field(default_factory=list)


def _select_cases(stats: ImageStatistics, decision: Decision, thresholds: Thresholds, per_group: int) -> dict[str, list[int]]:
    """Indices of the best, worst and borderline images (no image in two groups)."""
    n = len(stats.labels)
    score = decision.leaderboard if stats.has_masks else (decision.flagged == stats.labels).astype(float)
    confidence = np.abs(stats.probabilities - 0.5)
    used: set[int] = set()

    def take(order: Sequence[int]) -> list[int]:
        chosen = [int(i) for i in order if int(i) not in used][:per_group]
        used.update(chosen)
        return chosen

    worst = take(np.lexsort((-confidence, score)))  # lowest score; most confident mistakes first
    interesting = np.flatnonzero(stats.labels) if stats.labels.any() else np.arange(n)
    best = take(interesting[np.lexsort((-confidence[interesting], -score[interesting]))])
    borderline = take(np.argsort(np.abs(stats.probabilities - thresholds.probability), kind="stable"))
    return {"best": best, "worst": worst, "borderline": borderline}


def _render_cases(
    models: LoadedModels, stats: ImageStatistics, decision: Decision, thresholds: Thresholds, per_group: int
) -> list[Case]:
    recipe = models.manifest.preprocessing
    cases: list[Case] = []
    for group, indices in _select_cases(stats, decision, thresholds, per_group).items():
        if not indices:
            continue
        examples = [stats.examples[i] for i in indices]
        images = [_decode(example, recipe) for example in examples]
        _, maps = network_outputs(models, images)
        for i, example, image, unet_map in zip(indices, examples, images, maps):
            mask = source_lesion_mask(unet_map, image.shape, thresholds.mask)
            dice = decision.leaderboard[i] if stats.has_masks else None
            cases.append(
                Case(
                    group=group,
                    example=example,
                    image=image,
                    truth=example.mask() if stats.has_masks else None,
                    unet_mask=mask,
                    flagged=bool(decision.flagged[i]),
                    probability=float(stats.probabilities[i]),
                    area_px=int(mask.sum()),
                    dice=None if dice is None or not math.isfinite(dice) else float(dice),
                )
            )
    return cases


def evaluate_bundle(
    bundle: Bundle,
    models: LoadedModels,
    data: DatasetIndex,
    held_out: HeldOut,
    *,
    batch_size: int = 8,
    cases_per_group: int = 4,
    on_images: Callable[[int], None] | None = None,
) -> Evaluation:
    """Evaluate ``bundle`` (loaded as ``models``) on the held-out images at its own thresholds."""
    thresholds = bundle.manifest.thresholds
    stats = collect_statistics(
        models,
        held_out.examples,
        [thresholds.mask],
        with_masks=data.has_masks,
        batch_size=batch_size,
        rle_thresholds=[thresholds.mask],
        profile_images=batch_size,
        on_images=on_images,
    )
    decision = decide(stats, thresholds)
    metrics = summarise(stats, thresholds, decision)
    metrics["model"] = {
        "name": bundle.manifest.name,
        "version": bundle.manifest.version,
        "path": str(bundle.path),
        "synthetic_demo": bundle.manifest.synthetic_demo,
        "intended_use": bundle.manifest.intended_use,
    }
    metrics["data"] = data.describe()
    metrics["split"] = {"name": held_out.split, "file": str(held_out.split_file or ""), "note": held_out.note}
    cases = _render_cases(models, stats, decision, thresholds, cases_per_group) if cases_per_group else []
    return Evaluation(bundle, data, held_out, stats, thresholds, decision, metrics, cases)


