"""Training-time augmentation with MONAI dictionary transforms.

Applied to the cached, resized image (1, S, S) in [0, 1] and, for segmenters, to its mask with the
same geometry (nearest-neighbour for the mask); never at inference. Intensity changes touch the
image only. The CLAHE of a recipe is not an augmentation: it is part of the preprocessing, applied
to every image by training and the worker alike (:mod:`contract.preprocess`).
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    RandZoomd,
)

from training.presets import Augmentation

__all__ = ["build_augmentation"]


def build_augmentation(settings: Augmentation, size: int, with_mask: bool, seed: int) -> Compose:
    """The random transforms of ``settings`` for images of side ``size``, seeded by ``seed``.

    Rotation, left-right flip, random crop (a zoom into the image kept at its size), elastic
    deformation (geometry: image and mask), brightness (intensity scale), contrast (gamma) and
    Gaussian noise (image only). A probability of 0 leaves a transform out.
    """
    keys = ["image", "mask"] if with_mask else ["image"]
    linear = ("bilinear", "nearest") if with_mask else "bilinear"
    transforms = []
    if settings.rotate_p > 0 and settings.rotate_degrees > 0:
        angle = math.radians(settings.rotate_degrees)
        transforms.append(RandRotated(keys, range_x=angle, prob=settings.rotate_p, mode=linear, padding_mode="zeros"))
    if settings.flip_p > 0:
        transforms.append(RandFlipd(keys, prob=settings.flip_p, spatial_axis=1))
    if settings.crop_p > 0 and settings.crop_scale < 1:
        transforms.append(
            RandZoomd(
                keys,
                prob=settings.crop_p,
                min_zoom=1.0,
                max_zoom=1.0 / settings.crop_scale,
                mode=("area", "nearest") if with_mask else "area",
                keep_size=True,
            )
        )
    if settings.elastic_p > 0:
        transforms.append(
            Rand2DElasticd(
                keys,
                spacing=max(4, size // 8),
                magnitude_range=(1.0, 2.0),
                prob=settings.elastic_p,
                mode=linear,
                padding_mode="zeros",
            )
        )
    if settings.brightness > 0:
        transforms.append(RandScaleIntensityd("image", factors=settings.brightness, prob=0.5))
    if settings.contrast_p > 0:
        transforms.append(RandAdjustContrastd("image", prob=settings.contrast_p, gamma=settings.contrast_gamma))
    if settings.noise_p > 0 and settings.noise_std > 0:
        transforms.append(RandGaussianNoised("image", prob=settings.noise_p, std=settings.noise_std))
    compose = Compose(transforms)
    compose.set_random_state(seed=seed)
    return compose
