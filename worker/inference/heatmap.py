"""Grad-CAM heat map of the classifier for one radiograph, on the source image's own grid.

The map is MONAI's :class:`monai.visualize.GradCAM` of the classifier's single pneumothorax logit,
computed on the same network input the prediction uses (:func:`network_inputs`, the classifier's own
input grid), resized back to (Rows, Columns) like the U-Net's probability map (:func:`mask_to_source`)
and scaled to 0..1.

It shows where the classifier looked; it is not a segmentation and says nothing the probability
does not. The result writers blend it onto the secondary capture for the reader.

MONAI's hooks are registered on a private copy of the classifier: ``ModelWithHooks`` never removes
the hooks it adds and turns off ``inplace`` on the target layer, and the backward pass needs
gradients, so working on the shared network would change it for every later prediction. The copy
is made per call (the classifier is small next to the image work around it) and dropped after.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from contract.networks import LoadedModels
from contract.preprocess import input_to_source, network_inputs

__all__ = ["GRADCAM_REGION_LEVEL", "gradcam_heatmap", "gradcam_region", "gradcam_target_layer"]

GRADCAM_REGION_LEVEL = 0.5
"""Where a classifier-only bundle's region lies: the heat map at half its maximum or more."""

# Architecture (manifest name, lower case) -> the layer whose activations and gradients Grad-CAM
# combines: the last spatial feature map before global pooling.
_TARGET_LAYERS = {
    "densenet121": "class_layers.relu",  # MONAI DenseNet: features -> class_layers.relu -> pool
    "resnet": "layer4",  # torchvision and timm ResNets (resnet18/34/50...): the last stage
    # torchxrayvision's classifiers, under contract.networks.OutputSelect's "net"
    "xrv-densenet121": "net.features.denseblock4",  # norm5's output is changed in place by a ReLU
    "xrv-resnet50": "net.layer4",
}
_FEATURE_LAYER_TYPES = (nn.Conv2d, nn.ReLU)


def gradcam_target_layer(network: nn.Module, architecture: str) -> str:
    """The name (as in ``network.named_modules()``) of the layer Grad-CAM should hook.

    The layer known for ``architecture`` when the network has it; else, for a timm model, its last
    feature stage (``feature_info``); else the last ``nn.Conv2d`` or ``nn.ReLU`` module, the last
    spatial feature layer of a plain convolutional classifier. Raises ValueError if there is none.
    """
    names = {name for name, _ in network.named_modules()}
    key = architecture.strip().lower()
    for prefix, layer in _TARGET_LAYERS.items():
        if key.startswith(prefix) and layer in names:
            return layer
    feature_info = getattr(network, "feature_info", None)
    if feature_info is not None:
        try:
            last_stage = feature_info[-1]["module"]
        except (IndexError, KeyError, TypeError):
            last_stage = None
        if last_stage in names:
            return last_stage
    candidates = [name for name, module in network.named_modules() if isinstance(module, _FEATURE_LAYER_TYPES)]
    if not candidates:
        raise ValueError(f"no layer for Grad-CAM in the {architecture} classifier: it has no Conv2d or ReLU module")
    return candidates[-1]


def gradcam_heatmap(models: LoadedModels, image: np.ndarray) -> np.ndarray:
    """The classifier's Grad-CAM for ``image`` (a :func:`decode_radiograph` image), float32 0..1.

    The result has the image's shape (Rows, Columns); it is all zeros when the classifier's logit
    has no positive evidence anywhere (a flat map). Runs with gradients enabled even when called
    under ``torch.inference_mode``; the classifier in ``models`` is not changed (see the module
    docstring).
    """
    from monai.visualize import GradCAM  # imported here: only callers that want a heat map pay for it

    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"gradcam_heatmap expects a 2-D image (Rows, Columns), got shape {image.shape}")
    net_input = network_inputs([image], models.manifest.preprocessing, models.classifier_preprocessing)[0]
    layer = gradcam_target_layer(models.classifier, models.manifest.classifier.architecture)

    with torch.inference_mode(False), torch.enable_grad():
        network = copy.deepcopy(models.classifier).eval()
        # Gradients are needed with respect to the activations only, not the weights.
        network.requires_grad_(False)
        x = torch.from_numpy(net_input)[None].to(models.device).requires_grad_(True)
        cam = GradCAM(nn_module=network, target_layers=layer, postprocessing=_identity)
        # One logit per image: class index 0 is "pneumothorax".
        activation = cam(x, class_idx=0)
        small = activation[0, 0].detach().float().cpu().numpy()
        del cam, network, x

    heat = input_to_source(small, image.shape, models.classifier_preprocessing)
    return _unit_range(heat)


def gradcam_region(models: LoadedModels, image: np.ndarray) -> np.ndarray:
    """Boolean (Rows, Columns): where the classifier's Grad-CAM reaches :data:`GRADCAM_REGION_LEVEL`.
    A classifier-only bundle's region for a flagged image; it shows where the classifier looked,
    which is not an outline of the pneumothorax."""
    return gradcam_heatmap(models, image) >= GRADCAM_REGION_LEVEL


def _identity(x: torch.Tensor) -> torch.Tensor:
    """MONAI's default post-processing flips the map (max -> 0); the scaling is done here instead."""
    return x


def _unit_range(heat: np.ndarray) -> np.ndarray:
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    heat = np.maximum(heat, 0.0)
    top = float(heat.max())
    if top <= 0.0:
        return np.zeros(heat.shape, dtype=np.float32)
    low = float(heat.min())
    if top - low <= 1e-12 * top:
        return np.zeros(heat.shape, dtype=np.float32)
    return ((heat - low) / (top - low)).astype(np.float32)
