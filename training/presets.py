"""The published recipes Pleura grew from, each a named, typed training config.

A :class:`Preset` holds everything a run needs besides the data: the network, its input, the loss,
the optimiser and schedule, early stopping, class-imbalance handling and augmentation. Every field
can be overridden by name (``pleura train --set lr=3e-4`` or the dedicated flags), and the preset
with its overrides is written into the bundle, so a model says how it was made.

Sizes and batch sizes follow the papers where they say; where they do not, a documented choice is
made here (see ``docs/training.md``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from config.errors import PleuraError

__all__ = ["Augmentation", "PRESETS", "Preset", "PresetError", "get_preset", "parse_override", "with_overrides"]


class PresetError(PleuraError, ValueError):
    """An unknown preset or an override that does not fit; the message names it."""


class Augmentation(BaseModel):
    """Random augmentation of the training images (MONAI transforms); probabilities per image."""

    rotate_degrees: float = Field(default=10.0, ge=0, le=180)
    rotate_p: float = Field(default=0.5, ge=0, le=1)
    flip_p: float = Field(default=0.0, ge=0, le=1, description="left-right flip (moves the heart: off by default)")
    crop_scale: float = Field(default=0.85, gt=0, le=1, description="smallest random crop, as a fraction of the side")
    crop_p: float = Field(default=0.3, ge=0, le=1)
    brightness: float = Field(default=0.1, ge=0, le=1, description="random intensity scale +-")
    contrast_gamma: tuple[float, float] = (0.8, 1.25)
    contrast_p: float = Field(default=0.3, ge=0, le=1)
    noise_std: float = Field(default=0.02, ge=0)
    noise_p: float = Field(default=0.2, ge=0, le=1)
    elastic_p: float = Field(default=0.0, ge=0, le=1)

    @classmethod
    def off(cls) -> Augmentation:
        return cls(rotate_p=0, flip_p=0, crop_p=0, brightness=0, contrast_p=0, noise_p=0, elastic_p=0)


class Preset(BaseModel, validate_assignment=True):
    name: str
    task: Literal["classify", "segment"]
    source: str = Field(description="the recipe's origin")
    architecture: str
    encoder: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="network keyword arguments")
    encoder_weights: Literal["none", "imagenet"] = "none"
    input_size: int = Field(ge=32)
    channels: int = Field(default=1, ge=1, le=3)
    clahe: bool = False
    clahe_clip_limit: float = Field(default=0.01, gt=0)
    normalisation: Literal["unit", "zscore"] = "unit"
    loss: Literal["bce", "squared_hinge", "dice", "dice_bce", "dice_focal", "jaccard_bce"]
    optimiser: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=2)
    epochs: int = Field(default=50, ge=1)
    steps_per_epoch: int | None = Field(default=None, ge=1, description="cap on batches per epoch (None: all)")
    patience: int = Field(default=10, ge=0, description="epochs without improvement before stopping; 0 = never")
    scheduler: Literal["none", "plateau", "cosine"] = "none"
    monitor: Literal["auc", "dice", "loss"] | None = Field(default=None, description="validation metric; by task")
    positives_only: bool = False
    imbalance: Literal["none", "weight", "sample"] = "none"
    augment: Augmentation = Field(default_factory=Augmentation)
    seed: int = 0
    amp: bool = Field(default=True, description="mixed precision on CUDA (ignored on CPU)")
    probability_threshold: float = Field(default=0.5, ge=0, le=1)
    mask_threshold: float = Field(default=0.5, ge=0, le=1)
    min_area_px: int | None = Field(default=None, ge=0, description="None: keep the base bundle's")
    kind: Literal["radiograph", "ct"] = Field(default="radiograph", description="what the network analyses")
    hu_window: tuple[float, float] | None = Field(default=None, description="CT: HU (level, width) mapped to 0..1")
    split: tuple[float, float, float] | None = Field(
        default=None, description="the recipe's train/val/test fractions (None: the command's --split)"
    )
    min_volume_ml: float = Field(default=1.0, ge=0, description="CT: smallest 3D component that counts, mL")

    @model_validator(mode="after")
    def _consistent(self) -> Preset:
        classify_losses, segment_losses = ("bce", "squared_hinge"), ("dice", "dice_bce", "dice_focal", "jaccard_bce")
        if self.task == "classify" and self.loss not in classify_losses:
            raise ValueError(f"a classifier takes loss {' or '.join(classify_losses)}, not {self.loss}")
        if self.task == "segment" and self.loss not in segment_losses:
            raise ValueError(f"a segmenter takes loss {', '.join(segment_losses)}, not {self.loss}")
        if self.task == "segment" and self.architecture not in ("unet", "basicunet"):
            raise ValueError(f"segmenter architecture must be unet or basicunet, not {self.architecture}")
        if self.task == "classify" and self.architecture in ("unet", "basicunet"):
            raise ValueError("a classifier cannot be a unet")
        if self.task == "segment" and self.imbalance == "weight":
            raise ValueError("imbalance 'weight' weights the classifier loss; for a segmenter use 'sample'")
        if self.task == "classify" and self.positives_only:
            raise ValueError("positives_only is for segmenters")
        if self.kind == "ct" and (self.task != "segment" or self.hu_window is None):
            raise ValueError("a CT preset segments (task segment) and needs hu_window (level, width)")
        if self.kind == "radiograph" and self.hu_window is not None:
            raise ValueError("hu_window is for CT presets (kind ct)")
        if self.monitor == "auc" and self.task == "segment" or self.monitor == "dice" and self.task == "classify":
            raise ValueError(f"monitor {self.monitor} does not fit task {self.task}")
        return self

    @property
    def monitored(self) -> str:
        return self.monitor or ("auc" if self.task == "classify" else "dice")

    @property
    def network_role(self) -> Literal["classifier", "segmenter"]:
        return "classifier" if self.task == "classify" else "segmenter"


_TRANSFER = "transfer-learning classifier paper"
_BOLOURI = "Bolouri"
_HUANG = "Huang"
_KHATTAR = "Khattar et al."
_GENCER = "Gencer and Toker (CT)"
LUNG_WINDOW = (-600.0, 1500.0)
"""HU (level, width) of the CT preset: -1350..150 HU, air to soft tissue, mapped to 0..1."""


def _classifier(name: str, source: str, architecture: str, **fields: Any) -> Preset:
    defaults: dict[str, Any] = dict(
        task="classify",
        input_size=224,
        channels=3,
        loss="bce",
        optimiser="adam",
        lr=1e-4,
        batch_size=32,
        epochs=50,
        patience=10,
    )
    return Preset(name=name, source=source, architecture=architecture, **{**defaults, **fields})


def _segmenter(name: str, source: str, encoder: str, **fields: Any) -> Preset:
    defaults: dict[str, Any] = dict(
        task="segment",
        architecture="unet",
        input_size=256,
        channels=1,
        loss="dice_bce",
        optimiser="adam",
        lr=1e-4,
        batch_size=16,
        epochs=50,
        patience=10,
    )
    return Preset(name=name, source=source, encoder=encoder, **{**defaults, **fields})


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        _classifier("cls-densenet121", f"{_TRANSFER}; {_BOLOURI}; {_HUANG}", "densenet121"),
        _classifier("cls-resnet50", _TRANSFER, "resnet50"),
        _classifier("cls-densenet121-svm", _BOLOURI, "densenet121", loss="squared_hinge"),
        _classifier(
            "cls-cbr-baseline",
            _HUANG,
            "cbr",
            channels=1,
            lr=5e-4,
            weight_decay=1e-3,
            batch_size=64,
            extra={"channels": [32, 64, 128, 256], "kernel_size": 7, "dropout": 0.25},
        ),
        _classifier("cls-resnet18", _HUANG, "resnet18"),
        _segmenter(
            "seg-unet-resnet34-dicefocal",
            _BOLOURI,
            "resnet34",
            input_size=1024,
            batch_size=4,
            loss="dice_focal",
            positives_only=True,
        ),
        *(
            _segmenter(f"seg-unet-{encoder}", _KHATTAR, encoder, loss="dice_bce", scheduler="plateau")
            for encoder in ("resnet50", "efficientnet-b0", "xception")
        ),
        *(
            _segmenter(f"seg-unet-{encoder}", _HUANG, encoder, loss="dice", positives_only=True)
            for encoder in ("resnet18", "vgg13")
        ),
        # 2D U-Net slice by slice on 512 x 512 axial slices, HU normalised to 0..1, BCE + Jaccard,
        # Adam 1e-4, early stopping after 8 epochs, 64/16/20 split. No augmentation is named by the
        # recipe: none is applied. Batch size is not given: 8 fits a 16 GB GPU at 512 px.
        _segmenter(
            "ct-seg-unet-resnet50",
            _GENCER,
            "resnet50",
            kind="ct",
            input_size=512,
            hu_window=LUNG_WINDOW,
            loss="jaccard_bce",
            batch_size=8,
            epochs=100,
            patience=8,
            split=(0.64, 0.16, 0.20),
            augment=Augmentation.off(),
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` (``augment.flip_p=0.5`` for a nested field); the value is JSON when it parses."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PresetError(f"override {text!r}: expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def with_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """A copy of ``preset`` with ``overrides`` (field name -> value, dotted for nested) applied and checked."""
    data = preset.model_dump()
    for key, value in overrides.items():
        if value is None:
            continue
        target, *rest = key.split(".")
        if target not in Preset.model_fields or target == "name":
            raise PresetError(f"override {key}: no such setting (known: {', '.join(sorted(Preset.model_fields))})")
        if rest:
            known = data[target] if isinstance(data[target], dict) else {}
            if target != "extra" and rest[0] not in known:  # extra: any network keyword argument
                raise PresetError(f"override {key}: {target} has no setting {'.'.join(rest)}")
            data[target][rest[0]] = value
        else:
            data[target] = value
    try:
        return Preset.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'preset'}: {e['msg']}" for e in exc.errors())
        raise PresetError(f"preset {preset.name} with overrides {overrides}: {problems}") from None
