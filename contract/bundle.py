"""Model bundles: a directory with the weights and a ``manifest.json`` that says how they were made.

The manifest is the whole contract between training and inference: the worker builds the models,
preprocesses the images and takes its decisions from it alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from config.errors import PleuraError

MANIFEST_NAME = "manifest.json"
DEMO_INTENDED_USE = (
    "SYNTHETIC DEMO MODEL trained on generated images only - for testing the software, not for clinical use"
)


class BundleError(PleuraError, ValueError):
    """A bundle is missing, incomplete or its manifest is invalid; the message names the file."""


class Preprocessing(BaseModel):
    """How a stored image becomes the network's input. Shared by training and the worker."""

    input_size: int = Field(default=256, ge=32, description="square network input, pixels")
    channels: int = Field(default=1, ge=1, le=3)
    voi: Literal["dicom", "minmax"] = Field(
        default="dicom", description="dicom: the image's VOI LUT or window, else its full range"
    )
    invert_monochrome1: bool = True
    clahe: bool = False
    clahe_clip_limit: float = 0.01
    normalisation: Literal["unit", "zscore", "range"] = Field(
        default="unit",
        description="unit: [0, 1] as decoded; zscore: (x - mean) / std; range: [0, 1] mapped linearly "
        "onto value_range (torchxrayvision's [-1024, 1024])",
    )
    mean: float = 0.5
    std: float = 0.25
    value_range: tuple[float, float] = Field(default=(-1024.0, 1024.0), description="range: the output range")
    crop: Literal["none", "centre_square"] = Field(
        default="none",
        description="none: the whole image is resized; centre_square: first the centred square of the "
        "shorter side (torchxrayvision's XRayCenterCrop)",
    )
    resize: Literal["bilinear", "skimage"] = Field(
        default="bilinear",
        description="bilinear: antialiased bilinear resize of the [0, 1] image, then normalisation; "
        "skimage: normalisation first, then scikit-image's resize (order 1, anti-aliasing, constant "
        "mode), exactly torchxrayvision's XRayResizer",
    )
    hu_window: tuple[float, float] | None = Field(default=None, description="CT only: (level, width)")


class NetworkInput(BaseModel):
    """A network's own input grid, when it differs from the manifest's preprocessing.

    Decoding (VOI, MONOCHROME1, CLAHE) is shared by both networks of a bundle; the size, channels
    and normalisation may differ (a 224 px classifier beside a 256 px U-Net).
    """

    input_size: int = Field(ge=32, description="square network input, pixels")
    channels: int = Field(default=1, ge=1, le=3)
    normalisation: Literal["unit", "zscore", "range"] = "unit"
    mean: float = 0.5
    std: float = 0.25
    value_range: tuple[float, float] | None = None
    crop: Literal["none", "centre_square"] | None = None
    resize: Literal["bilinear", "skimage"] | None = None
    clahe: bool | None = Field(default=None, description="CLAHE for this network only (None: the manifest's)")
    clahe_clip_limit: float | None = None


class NetworkSpec(BaseModel):
    architecture: str = Field(
        description="densenet121 | resnet18 | resnet50 | cbr | unet | basicunet | xrv-densenet121 | xrv-resnet50"
    )
    encoder: str | None = Field(default=None, description="U-Net encoder (smp name), e.g. resnet34")
    weights_file: str
    extra: dict = Field(default_factory=dict, description="architecture keyword arguments")
    input: NetworkInput | None = Field(default=None, description="own input grid; None = the manifest's")
    training: dict = Field(
        default_factory=dict, description="how it was trained: preset, hyperparameters, data, validation metrics"
    )


class Thresholds(BaseModel):
    probability: float = Field(default=0.5, ge=0, le=1, description="classifier probability that flags")
    mask: float = Field(default=0.5, ge=0, le=1, description="U-Net pixel probability inside the mask")
    min_area_px: int = Field(default=64, ge=0, description="smallest mask area (source pixels) that counts")
    min_volume_ml: float = Field(default=1.0, ge=0, description="CT: smallest 3D component (mL) that counts")


BundleKind = Literal["radiograph", "ct"]


class ComponentSource(BaseModel):
    """Where one network of a composed bundle (`pleura models compose`) came from."""

    role: Literal["classifier", "segmenter"]
    name: str = Field(description="the source bundle's name")
    version: str = Field(description="the source bundle's version")
    weights_file: str = Field(description="the network's weights file in the source bundle")
    sha256: str = Field(description="SHA-256 of that weights file (the same bytes are this bundle's copy)")
    synthetic_demo: bool = False
    provenance: dict = Field(default_factory=dict, description="the source bundle's own provenance")

    @property
    def label(self) -> str:
        return f"{self.role} {self.name} {self.version}"


class Manifest(BaseModel):
    name: str
    version: str
    kind: BundleKind = Field(
        default="radiograph",
        description="what the bundle analyses: chest radiographs (CR/DX) or chest CT series; "
        "a registry keeps one active bundle per kind",
    )
    intended_use: str
    synthetic_demo: bool = Field(description="trained on synthetic data only")
    manufacturer: str = "Pleura"
    created: str | None = None
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    classifier: NetworkSpec | None = Field(default=None, description="required for a radiograph bundle; none for CT")
    segmenter: NetworkSpec | None = Field(
        default=None,
        description="the U-Net; required for CT, optional for a radiograph bundle (classifier-only: the "
        "decision is the classifier's alone, and no SEG is written)",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    training_data: str = ""
    licence: str = Field(default="", description="the terms the weights are published under, for third-party weights")
    provenance: dict = Field(
        default_factory=dict, description="where third-party weights came from: their name, address, file, checksum"
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    components: list[ComponentSource] = Field(
        default_factory=list,
        description="a composed bundle: the source version, weights file and checksum of each network",
    )
    tuning: dict = Field(
        default_factory=dict, description="how `pleura tune` chose the thresholds: target, split, metrics"
    )

    @model_validator(mode="after")
    def _networks_for_kind(self) -> "Manifest":
        if self.kind == "radiograph" and self.classifier is None:
            raise ValueError("a radiograph bundle needs a classifier (kind 'ct' bundles have none)")
        if self.kind == "ct" and self.classifier is not None:
            raise ValueError("a CT bundle segments only: leave out 'classifier'")
        if self.kind == "ct" and self.preprocessing.hu_window is None:
            raise ValueError("a CT bundle needs preprocessing.hu_window (level, width) in Hounsfield units")
        if self.kind == "ct" and self.segmenter is None:
            raise ValueError("a CT bundle needs a segmenter")
        if self.segmenter is not None and self.network_preprocessing(self.segmenter).crop != "none":
            # The mask goes back onto the whole source grid by a plain resize (contract/decision.py).
            raise ValueError("a segmenter's input may not be cropped (crop is for classifiers only)")
        return self

    @property
    def classifier_only(self) -> bool:
        """A radiograph bundle without a U-Net: the classifier alone decides, and no SEG is written."""
        return self.kind == "radiograph" and self.segmenter is None

    @property
    def networks(self) -> list[NetworkSpec]:
        """The bundle's networks: classifier (radiograph bundles) and segmenter."""
        return [spec for spec in (self.classifier, self.segmenter) if spec is not None]

    def network_preprocessing(self, spec: NetworkSpec) -> Preprocessing:
        """The full recipe for one of the bundle's networks: shared decoding, its own input grid."""
        if spec.input is None:
            return self.preprocessing
        own = spec.input.model_dump(exclude_none=True)
        if self.preprocessing.clahe and own.get("clahe") is False:
            raise BundleError(
                f"manifest: network {spec.weights_file} turns CLAHE off, but the bundle's shared decoding applies it"
            )
        return self.preprocessing.model_copy(update=own)


@dataclass(frozen=True)
class ModelIdentity:
    """What every result object says about the model that made it."""

    name: str
    version: str
    manufacturer: str
    synthetic_demo: bool
    intended_use: str
    components: tuple[str, ...] = ()
    """A composed bundle: each network's role, source name and version ("classifier NAME VERSION")."""

    @property
    def label(self) -> str:
        demo = " (SYNTHETIC DEMO MODEL, not for clinical use)" if self.synthetic_demo else ""
        return f"{self.name} {self.version}{demo}"


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def identity(self) -> ModelIdentity:
        m = self.manifest
        return ModelIdentity(m.name, m.version, m.manufacturer, m.synthetic_demo, m.intended_use,
                             tuple(component.label for component in m.components))

    def weights_path(self, spec: NetworkSpec) -> Path:
        return self.path / spec.weights_file


def load_bundle(path: Path | str) -> Bundle:
    """Read and check a bundle directory; raise :class:`BundleError` naming what is wrong."""
    root = Path(path)
    manifest_file = root / MANIFEST_NAME
    if not manifest_file.is_file():
        raise BundleError(
            f"no model bundle at {root}: {manifest_file} is missing "
            "(set PLEURA_MODEL_BUNDLE_DIR or PLEURA_MODEL_REGISTRY_DIR, or run `pleura demo-model` to build the "
            "demo bundle)"
        )
    try:
        manifest = Manifest.model_validate(json.loads(manifest_file.read_text(encoding="utf-8")))
    except UnicodeDecodeError:
        raise BundleError(
            f"unreadable manifest {manifest_file}: not UTF-8 JSON (a damaged copy?): export or rebuild the bundle again"
        ) from None
    except OSError as exc:
        raise BundleError(f"unreadable manifest {manifest_file}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BundleError(f"invalid manifest {manifest_file}: {exc}") from None
    bundle = Bundle(root, manifest)
    for spec in manifest.networks:
        if not bundle.weights_path(spec).is_file():
            raise BundleError(f"bundle {root}: weights file {bundle.weights_path(spec)} is missing")
    return bundle


def write_manifest(path: Path | str, manifest: Manifest) -> Path:
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    target = root / MANIFEST_NAME
    tmp = root / f".{MANIFEST_NAME}.tmp"  # written whole, then renamed: a reader never sees half a manifest
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(tmp, target)
    return target
