"""Run a bundle's classifier and U-Net on decoded radiographs and take the decision for each image.

The decision itself is the model contract's rule (:mod:`contract.decision`), the one that evaluation
and threshold tuning apply too. This module runs the forward passes, finds the spacing sizes are measured with, and
builds the findings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
import torch

from contract.decision import flag_decision, min_area_px, source_lesion_mask
from contract.reasons import decision_reason
from contract.networks import LoadedModels
from contract.preprocess import describe_source, network_inputs
from worker.inference.heatmap import gradcam_region
from worker.inference.lungs import LungSegmenter
from worker.inference.measure import measure_mask
from worker.inference.result import ImageFinding
from worker.inference.runtime import forward_context, to_device

__all__ = ["PhysicalSpacing", "network_outputs", "physical_spacing", "pixel_spacing_mm", "predict_images"]


def positive_pair(value: object) -> tuple[float, float] | None:
    """Two finite, positive numbers from a DS pair, else None."""
    if value is None:
        return None
    try:
        pair = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair[0], pair[1]


@dataclass(frozen=True)
class PhysicalSpacing:
    """(row, column) spacing in mm at the patient, and in words which attributes it came from (the
    report says so, since a detector spacing overstates sizes by the magnification)."""

    row_mm: float
    column_mm: float
    source: str


def physical_spacing(ds: pydicom.Dataset) -> PhysicalSpacing | None:
    """The spacing sizes in mm are measured with, or None when the image carries none usable.

    PS3.3 10.7.1.3: Pixel Spacing with a Pixel Spacing Calibration Type (GEOMETRY, FIDUCIAL) is
    calibrated at the patient and is used as it is. Otherwise Imager Pixel Spacing (at the
    detector) divided by Estimated Radiographic Magnification Factor, when that is present and
    positive; a Pixel Spacing equal to the Imager Pixel Spacing is the detector's, uncorrected, and is
    read the same way. A Pixel Spacing alone (CR without an imager spacing) is used as it is and
    said to be of unknown calibration. Absent, zero or malformed values count as absent.
    """
    pixel = positive_pair(ds.get("PixelSpacing"))
    imager = positive_pair(ds.get("ImagerPixelSpacing"))
    calibration = str(ds.get("PixelSpacingCalibrationType", "") or "").strip().upper()
    if pixel is not None and calibration:
        detail = str(ds.get("PixelSpacingCalibrationDescription", "") or "").strip()
        how = f"Pixel Spacing, calibrated at the patient ({calibration}{': ' + detail if detail else ''})"
        return PhysicalSpacing(pixel[0], pixel[1], how)
    if imager is None or (pixel is not None and not _same(pixel, imager)):
        if pixel is None:
            return None
        return PhysicalSpacing(pixel[0], pixel[1], "Pixel Spacing (calibration not stated)")
    factor = _magnification(ds)
    if factor is None:
        return PhysicalSpacing(
            imager[0], imager[1], "Imager Pixel Spacing at the detector, not corrected for magnification"
        )
    return PhysicalSpacing(
        imager[0] / factor, imager[1] / factor,
        f"Imager Pixel Spacing corrected by Estimated Radiographic Magnification Factor {factor:g}",
    )


def _same(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))


def _magnification(ds: pydicom.Dataset) -> float | None:
    """Estimated Radiographic Magnification Factor when present, finite and positive."""
    value = ds.get("EstimatedRadiographicMagnificationFactor")
    try:
        factor = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return factor if factor is not None and math.isfinite(factor) and factor > 0 else None


def pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm at the patient (:func:`physical_spacing`), or None."""
    spacing = physical_spacing(ds)
    return None if spacing is None else (spacing.row_mm, spacing.column_mm)


def network_outputs(
    models: LoadedModels,
    images: Sequence[np.ndarray],
    networks: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass of each network on a batch of decoded images.

    Returns the classifier probabilities (N,) and the U-Net probability maps (N, H, W) on the
    U-Net's own input grid (:func:`~contract.preprocess.mask_to_source` takes them to the
    source grid). Evaluation and threshold tuning use this too, so they measure what the node decides.
    ``networks`` (classifier, segmenter) replace ``models``' own, e.g. their ONNX Runtime exports.
    A classifier-only bundle has no U-Net: its maps are empty, shape (N, 1, 1), so everyone who reads
    them (the batcher, evaluation) finds no mask without a case of its own.
    """
    classifier, segmenter = networks or models.compiled or (models.classifier, models.segmenter)
    if segmenter is None:
        batch = torch.from_numpy(network_inputs(images, models.manifest.preprocessing, models.classifier_preprocessing))
        with forward_context(models):
            logits = classifier(to_device(batch, models.device)).float()
            probabilities = torch.sigmoid(logits).reshape(len(images), -1)[:, 0].cpu().numpy()
        return probabilities, np.zeros((len(images), 1, 1), dtype=np.float32)
    decoded_with = models.manifest.preprocessing
    classifier_recipe, segmenter_recipe = models.classifier_preprocessing, models.segmenter_preprocessing
    batch = torch.from_numpy(network_inputs(images, decoded_with, classifier_recipe))
    if segmenter_recipe == classifier_recipe:
        segmenter_batch = batch
    else:  # each network has its own input grid
        segmenter_batch = torch.from_numpy(network_inputs(images, decoded_with, segmenter_recipe))
    shared = segmenter_batch is batch
    with forward_context(models):  # on CUDA: autocast, pinned memory, channels-last (runtime.py)
        batch = to_device(batch, models.device)
        segmenter_batch = batch if shared else to_device(segmenter_batch, models.device)
        # Logits to fp32 before the sigmoid: under fp16 autocast a probability near 1 would keep
        # only about three digits (a no-op on the CPU, which computes in fp32).
        probabilities = torch.sigmoid(classifier(batch).float()).reshape(len(images), -1)[:, 0]
        mask_probabilities = torch.sigmoid(segmenter(segmenter_batch).float())[:, 0]
        return probabilities.float().cpu().numpy(), mask_probabilities.float().cpu().numpy()


def predict_images(
    models: LoadedModels,
    images: Sequence[np.ndarray],
    sources: Sequence[pydicom.Dataset],
    batch_size: int = 8,
    forward: Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray]] | None = None,
    lung_segmenter: LungSegmenter | None = None,
) -> list[ImageFinding]:
    """One :class:`ImageFinding` per image, in order.

    ``images`` are :func:`~contract.preprocess.decode_radiograph` outputs and ``sources``
    the datasets they came from (for the pixel spacing). Each batch takes one forward pass of the
    classifier and one of the U-Net. The U-Net probability map is resized to the source grid and
    thresholded at ``thresholds.mask``; the image is flagged when the classifier probability reaches
    ``thresholds.probability`` and that mask covers at least ``thresholds.min_area_px`` source
    pixels. Side, largest gap and hemithorax fraction come from
    :func:`~worker.inference.measure.measure_mask`. The mask is reported as the U-Net drew it even
    when the image is not flagged, so the writers and reviewers see what the segmenter saw;
    ``flagged`` carries the decision. ``forward`` replaces :func:`network_outputs` for each batch
    (the worker's :class:`~worker.inference.batcher.ForwardBatcher` shares passes between analyses).
    ``lung_segmenter`` (a :class:`~worker.inference.lungs.LungSegmenter`): its lung masks are the
    lung fields of the hemithorax fraction, in place of the threshold estimate.

    A classifier-only bundle (no U-Net) flags on the probability alone; a flagged image's ``mask`` is
    then the classifier's Grad-CAM region (:func:`~worker.inference.heatmap.gradcam_region`), which
    the GSPS and SC draw labelled as such (``region="gradcam"``); no area, side or gap is measured.
    """
    if len(images) != len(sources):
        raise ValueError(f"predict_images: {len(images)} images but {len(sources)} source datasets")
    if batch_size < 1:
        raise ValueError(f"predict_images: batch_size must be at least 1, got {batch_size}")
    for index, image in enumerate(images):
        if np.ndim(image) != 2:
            raise ValueError(f"predict_images: image {index} has shape {np.shape(image)}; expected (Rows, Columns)")
        rows, columns = sources[index].get("Rows"), sources[index].get("Columns")
        if rows is not None and columns is not None and (int(rows), int(columns)) != np.shape(image):
            raise ValueError(
                f"predict_images: image {index} has shape {np.shape(image)} but its source "
                f"{describe_source(sources[index])} has Rows {rows}, Columns {columns}"
            )

    thresholds = models.manifest.thresholds
    classifier_only = models.manifest.classifier_only
    min_area = min_area_px(models.manifest)
    findings: list[ImageFinding] = []
    for start in range(0, len(images), batch_size):
        batch_images = images[start : start + batch_size]
        if forward is None:
            probabilities, mask_probabilities = network_outputs(models, batch_images)
        else:
            probabilities, mask_probabilities = forward(batch_images)
        for offset, image in enumerate(batch_images):
            source = sources[start + offset]
            probability = float(probabilities[offset])
            if classifier_only:
                findings.append(_classifier_finding(models, image, source, probability))
                continue
            mask = source_lesion_mask(mask_probabilities[offset], image.shape, thresholds.mask)
            area_px = int(mask.sum())
            physical = physical_spacing(source)
            spacing = None if physical is None else (physical.row_mm, physical.column_mm)
            area_cm2 = area_px * spacing[0] * spacing[1] / 100.0 if spacing is not None else None
            flagged = flag_decision(probability, area_px, thresholds.probability, min_area)
            measured = measure_mask(
                mask, image, source, spacing,
                segment_lungs=None if lung_segmenter is None else lung_segmenter.fields,
                lungs_method=None if lung_segmenter is None else lung_segmenter.method,
            )
            findings.append(
                ImageFinding(
                    probability=probability,
                    threshold=thresholds.probability,
                    flagged=bool(flagged),
                    mask=mask,
                    area_px=area_px,
                    area_cm2=area_cm2,
                    side=measured.side,
                    side_assumed=measured.side_assumed,
                    gap_px=measured.gap_px,
                    gap_mm=measured.gap_mm,
                    hemithorax_fraction=measured.hemithorax_fraction,
                    lung_fields_method=measured.lung_fields_method,
                    decision=decision_reason(probability, area_px, thresholds.probability, thresholds.min_area_px),
                    spacing_source=None if physical is None else physical.source,
                )
            )
    return findings


def _classifier_finding(models: LoadedModels, image: np.ndarray, source: pydicom.Dataset, probability: float) -> ImageFinding:
    """The finding of a classifier-only bundle: the threshold decides; a flagged image carries its
    Grad-CAM region (where the classifier looked, not an outline of the pneumothorax)."""
    threshold = models.manifest.thresholds.probability
    flagged = bool(flag_decision(probability, 0, threshold, 0))
    mask = gradcam_region(models, image) if flagged else np.zeros(image.shape, dtype=bool)
    physical = physical_spacing(source)
    return ImageFinding(
        probability=probability,
        threshold=threshold,
        flagged=flagged,
        mask=mask,
        area_px=0,
        area_cm2=None,
        decision=decision_reason(probability, 0, threshold, 0, segmented=False),
        spacing_source=None if physical is None else physical.source,
        region="gradcam",
    )
