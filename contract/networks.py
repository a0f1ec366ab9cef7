"""The one model construction, used by training and by the worker alike.

A bundle's manifest names each network's architecture and keyword arguments;
:func:`build_network` turns that into a module (one constructor per architecture, in
``_CONSTRUCTORS``) and :func:`load_models` / :func:`load_segmenter` fill it with the bundle's weights.
Encoder weights are never downloaded here: pretrained encoders are a training-time choice and end up
in the bundle's own weights file. The same holds for torchxrayvision's published classifiers
(``xrv-densenet121``, ``xrv-resnet50``): built here without weights, they are filled from the
bundle's own copy of the weights that ``pleura models fetch`` imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from contract.bundle import Bundle, BundleError, Manifest, NetworkSpec, Preprocessing, Thresholds

__all__ = ["ARCHITECTURES", "LoadedModels", "OutputSelect", "import_torchxrayvision", "build_network", "load_models", "load_segmenter", "resolve_device"]

DEFAULT_UNET_ENCODER = "resnet34"


@dataclass
class LoadedModels:
    """A bundle's two networks in eval mode on one device, with the manifest that describes them."""

    classifier: nn.Module
    """Outputs one logit per image, shape (N, 1)."""
    segmenter: nn.Module | None
    """Outputs one logit per pixel of the network grid, shape (N, 1, H, W); None for a
    classifier-only bundle (:attr:`Manifest.classifier_only`)."""
    manifest: Manifest
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    """Mixed precision of the forward pass on CUDA (worker/inference/runtime.py); None = fp32."""
    compiled: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None
    """(classifier, segmenter) compiled with ``torch.compile`` for the forward pass (CUDA, opt-in);
    the modules above stay as they are for Grad-CAM."""

    @property
    def preprocessing(self) -> Preprocessing:
        return self.manifest.preprocessing

    @property
    def thresholds(self) -> Thresholds:
        return self.manifest.thresholds

    @property
    def classifier_preprocessing(self) -> Preprocessing:
        return self.manifest.network_preprocessing(self.manifest.classifier)

    @property
    def segmenter_preprocessing(self) -> Preprocessing:
        """The U-Net's recipe; a classifier-only bundle's classifier's (there is no other grid)."""
        return self.manifest.network_preprocessing(self.manifest.segmenter or self.manifest.classifier)


def build_network(spec: NetworkSpec, preprocessing: Preprocessing, encoder_weights: str | None = None) -> nn.Module:
    """A network for ``spec``, taking ``preprocessing.channels`` input channels, with one output.

    ``densenet121``: MONAI's 2-D DenseNet121 with one output logit; ``spec.extra`` may change
    ``init_features``, ``growth_rate``, ``block_config``, ``dropout_prob`` and the like.
    ``resnet18`` / ``resnet50``: timm's ResNets with one output logit (``spec.extra``: timm arguments
    such as ``drop_rate``).
    ``cbr``: MONAI's ``Classifier``, conv-BN-LeakyReLU blocks with stride 2 and a fully connected
    logit (Huang's baseline); ``spec.extra`` may set ``channels``, ``kernel_size``, ``dropout``.
    ``basicunet``: MONAI's BasicUNet (two convolutions per level, four poolings), small enough for
    the CT demo on a CPU; ``spec.extra`` may set ``features`` (six widths), ``act``, ``norm``, ``dropout``.
    ``unet``: segmentation-models-pytorch's Unet with one output class, encoder ``spec.encoder``
    (default resnet34); ``spec.extra`` may set ``encoder_depth``, ``decoder_channels`` and the like.
    ``xrv-densenet121`` / ``xrv-resnet50``: torchxrayvision's multi-label chest X-ray classifiers
    (its DenseNet; torchvision's ResNet-50 with a one-channel stem, as torchxrayvision builds it),
    one input channel, ``spec.extra["num_classes"]`` outputs of which ``spec.extra["output_index"]``
    (the Pneumothorax label) is the one logit passed on (:class:`OutputSelect`).

    ``encoder_weights`` is for training only: ``"imagenet"`` starts from published weights (downloaded
    by the library, so online only). The worker always builds with ``None`` and loads the bundle's
    own weights file.
    """
    architecture = spec.architecture.strip().lower()
    if encoder_weights not in (None, "imagenet"):
        raise BundleError(f"encoder weights {encoder_weights!r}: use none or imagenet")
    construct = _CONSTRUCTORS.get(architecture)
    if construct is None:
        raise BundleError(
            f"network spec {spec.weights_file}: unknown architecture {spec.architecture!r} "
            f"(known: {', '.join(ARCHITECTURES)})"
        )
    return construct(_Request(spec, architecture, dict(spec.extra), preprocessing, encoder_weights))


@dataclass
class _Request:
    """What one constructor is asked to build: the spec, its keyword arguments (a copy the
    constructor may consume), the input recipe and the starting weights."""

    spec: NetworkSpec
    architecture: str
    extra: dict
    preprocessing: Preprocessing
    encoder_weights: str | None

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    def refuse(self, fixed: tuple[str, ...]) -> None:
        """The arguments the constructor sets itself may not come from ``spec.extra``."""
        for name in fixed:
            if name in self.extra:
                raise BundleError(
                    f"network spec {self.spec.weights_file}: extra must not set {name!r} for {self.architecture}"
                )

    def invalid(self, exc: Exception) -> BundleError:
        return BundleError(
            f"network spec {self.spec.weights_file}: invalid {self.architecture} arguments {self.extra}: {exc}"
        )

    def no_published_weights(self) -> None:
        if self.encoder_weights:
            raise BundleError(f"{self.architecture} has no published weights: use encoder weights none")


def _densenet121(request: _Request) -> nn.Module:
    from monai.networks.nets import DenseNet121

    request.refuse(("spatial_dims", "in_channels", "out_channels", "pretrained"))
    if request.encoder_weights and request.channels != 3:
        raise BundleError("densenet121 with imagenet weights needs 3 input channels (set channels to 3)")
    try:
        return DenseNet121(
            spatial_dims=2, in_channels=request.channels, out_channels=1,
            pretrained=bool(request.encoder_weights), **request.extra,
        )
    except TypeError as exc:
        raise request.invalid(exc) from None


def _timm_classifier(request: _Request) -> nn.Module:
    import timm

    request.refuse(("pretrained", "in_chans", "num_classes"))
    try:
        return timm.create_model(
            request.architecture, pretrained=bool(request.encoder_weights), in_chans=request.channels,
            num_classes=1, **request.extra,
        )
    except TypeError as exc:
        raise request.invalid(exc) from None


def _cbr(request: _Request) -> nn.Module:
    from monai.networks.nets import Classifier

    request.refuse(("in_shape", "classes", "strides", "last_act"))
    request.no_published_weights()
    extra = request.extra
    widths = tuple(extra.pop("channels", (32, 64, 128, 256)))
    size = request.preprocessing.input_size
    try:
        return Classifier(
            in_shape=(request.channels, size, size),
            classes=1,
            channels=widths,
            strides=(2,) * len(widths),
            kernel_size=extra.pop("kernel_size", 7),
            num_res_units=extra.pop("num_res_units", 0),
            act=extra.pop("act", ("leakyrelu", {"negative_slope": 0.1})),
            norm=extra.pop("norm", "batch"),
            dropout=extra.pop("dropout", 0.25),
            **extra,
        )
    except (TypeError, ValueError) as exc:
        raise request.invalid(exc) from None


def _basicunet(request: _Request) -> nn.Module:
    from monai.networks.nets import BasicUNet

    request.refuse(("spatial_dims", "in_channels", "out_channels"))
    request.no_published_weights()
    size = request.preprocessing.input_size
    if size % 16:
        raise BundleError(
            f"network spec {request.spec.weights_file}: input_size {size} must be divisible by 16 "
            "for a basicunet (four poolings)"
        )
    try:
        return BasicUNet(spatial_dims=2, in_channels=request.channels, out_channels=1, **request.extra)
    except (TypeError, ValueError) as exc:
        raise request.invalid(exc) from None


def _unet(request: _Request) -> nn.Module:
    import segmentation_models_pytorch as smp

    request.refuse(("encoder_name", "encoder_weights", "in_channels", "classes"))
    spec, extra, size = request.spec, request.extra, request.preprocessing.input_size
    depth = int(extra.get("encoder_depth", 5))
    if size % (2**depth):
        raise BundleError(
            f"network spec {spec.weights_file}: input_size {size} must be divisible "
            f"by 2**encoder_depth = {2**depth} for a U-Net"
        )
    try:
        return smp.Unet(
            encoder_name=spec.encoder or DEFAULT_UNET_ENCODER,
            encoder_weights=request.encoder_weights,
            in_channels=request.channels,
            classes=1,
            **extra,
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise BundleError(
            f"network spec {spec.weights_file}: cannot build unet with encoder "
            f"{spec.encoder or DEFAULT_UNET_ENCODER!r} and arguments {extra}: {exc}"
        ) from None


class OutputSelect(nn.Module):
    """One output of a multi-label classifier as the bundle's single logit, shape (N, 1).

    The published network stays whole under ``net`` (its state dict is the published one with the
    prefix ``net.``), so its weights load unchanged and its other outputs are merely not used.
    """

    def __init__(self, net: nn.Module, output_index: int) -> None:
        super().__init__()
        self.net = net
        self.output_index = output_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, self.output_index : self.output_index + 1]


def _xrv_outputs(request: _Request) -> tuple[int, int]:
    """(num_classes, output_index) of a torchxrayvision classifier, checked."""
    request.no_published_weights()
    if request.channels != 1:
        raise BundleError(f"{request.architecture} takes one input channel (set channels to 1)")
    extra = request.extra
    try:
        classes, index = int(extra.pop("num_classes", 18)), int(extra.pop("output_index"))
    except (KeyError, TypeError, ValueError):
        raise BundleError(
            f"network spec {request.spec.weights_file}: {request.architecture} needs extra.output_index, "
            "the index of its Pneumothorax output"
        ) from None
    if not 0 <= index < classes:
        raise BundleError(f"network spec {request.spec.weights_file}: output_index {index} outside 0..{classes - 1}")
    if extra:
        raise request.invalid(ValueError(f"unknown arguments {sorted(extra)}"))
    return classes, index


def import_torchxrayvision():
    """The ``torchxrayvision`` package (the optional ``pretrained`` extra), imported without its side
    effect: its ``baseline_models`` put their own folders first on ``sys.path``, whose ``config`` and
    ``model`` packages would then shadow Pleura's ``config`` for every later import (the start-up
    check of import names stops on it). ``sys.path`` is put back as it was."""
    saved = list(sys.path)
    try:
        import torchxrayvision
    except ImportError:
        raise BundleError("torchxrayvision is not installed: install Pleura with the 'pretrained' extra") from None
    finally:
        sys.path[:] = saved
    return torchxrayvision


def _xrv_densenet121(request: _Request) -> nn.Module:
    classes, index = _xrv_outputs(request)
    xrv = import_torchxrayvision()
    return OutputSelect(xrv.models.DenseNet(weights=None, num_classes=classes, in_channels=1), index)


def _xrv_resnet50(request: _Request) -> nn.Module:
    from torchvision.models import resnet50

    classes, index = _xrv_outputs(request)
    net = resnet50(num_classes=classes, weights=None)
    # torchxrayvision's single-channel stem (models.ResNet); everything else is torchvision's.
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return OutputSelect(net, index)


_CONSTRUCTORS: dict[str, Callable[[_Request], nn.Module]] = {
    "densenet121": _densenet121,
    "resnet18": _timm_classifier,
    "resnet50": _timm_classifier,
    "cbr": _cbr,
    "unet": _unet,
    "basicunet": _basicunet,
    "xrv-densenet121": _xrv_densenet121,
    "xrv-resnet50": _xrv_resnet50,
}
"""One constructor per architecture a manifest may name (timm builds both ResNets by name)."""
ARCHITECTURES = tuple(_CONSTRUCTORS)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first GPU if there is one, else the CPU; ``cuda``/``cuda:N`` must exist."""
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is available (use auto or cpu)")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} was asked for, but only {torch.cuda.device_count()} CUDA GPU(s) are available"
            )
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    return resolved


def _load_weights(network: nn.Module, bundle: Bundle, spec: NetworkSpec, device: torch.device) -> nn.Module:
    path = bundle.weights_path(spec)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"bundle {bundle.path}: weights file {path} is missing") from None
    except Exception as exc:
        raise BundleError(f"bundle {bundle.path}: cannot read weights file {path}: {exc}") from None
    if not isinstance(state, dict):
        raise BundleError(f"bundle {bundle.path}: weights file {path} does not hold a state_dict")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(
            f"bundle {bundle.path}: weights file {path} does not fit the {spec.architecture} "
            f"described in the manifest: {exc}"
        ) from None
    return network.to(device).eval()


def load_models(bundle: Bundle, device: str = "auto") -> LoadedModels:
    """Build the networks from the manifest and load the bundle's weights, in eval mode on ``device``
    (the classifier, and the U-Net unless the bundle is classifier-only)."""
    target = resolve_device(device)
    manifest = bundle.manifest
    if manifest.kind != "radiograph" or manifest.classifier is None:
        raise BundleError(f"bundle {bundle.path} analyses {manifest.kind}, not radiographs (check PLEURA_MODEL_BUNDLE_DIR)")
    classifier, segmenter = (
        None if spec is None else _load_weights(build_network(spec, manifest.network_preprocessing(spec)), bundle, spec, target)
        for spec in (manifest.classifier, manifest.segmenter)
    )
    return LoadedModels(classifier=classifier, segmenter=segmenter, manifest=manifest, device=target)


def load_segmenter(bundle: Bundle, device: str = "auto") -> tuple[nn.Module, torch.device]:
    """A CT bundle's U-Net with its weights, in eval mode on ``device``: (network, device)."""
    target = resolve_device(device)
    manifest = bundle.manifest
    if manifest.kind != "ct":
        raise BundleError(f"bundle {bundle.path} analyses {manifest.kind}, not CT (check PLEURA_CT_MODEL_DIR)")
    spec = manifest.segmenter
    return _load_weights(build_network(spec, manifest.network_preprocessing(spec)), bundle, spec, target), target
