"""Grad-CAM heat maps of the demo bundle's classifier, on a real radiograph, and the layer choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from dicom_samples import dciodvfy_errors, pydicom_data_file, save_dataset
from contract.bundle import load_bundle
from contract.networks import LoadedModels, load_models
from contract.preprocess import decode_radiograph
from worker.inference.heatmap import gradcam_heatmap, gradcam_target_layer
from worker.inference.result import ImageFinding
from worker.writers.sc import build_sc

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def models(demo_bundle: Path) -> LoadedModels:
    return load_models(load_bundle(demo_bundle), "cpu")


@pytest.fixture(scope="module")
def radiograph(models: LoadedModels) -> tuple[pydicom.Dataset, np.ndarray]:
    source = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))  # real CR, MONOCHROME1, 1955 x 1841
    return source, decode_radiograph(source, models.manifest.preprocessing)


@pytest.fixture(scope="module")
def heatmap(models: LoadedModels, radiograph) -> np.ndarray:
    return gradcam_heatmap(models, radiograph[1])


def _hooks(network: nn.Module) -> int:
    return sum(
        len(module._forward_hooks) + len(module._backward_hooks) + len(module._forward_pre_hooks)
        for module in network.modules()
    )


def test_heatmap_is_a_unit_map_on_the_source_grid(heatmap, radiograph) -> None:
    _, image = radiograph
    assert heatmap.shape == image.shape
    assert heatmap.dtype == np.float32
    assert np.all(np.isfinite(heatmap))
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    assert heatmap.max() == pytest.approx(1.0)
    assert heatmap.std() > 0.05  # not constant: the classifier looked somewhere


def test_heatmap_is_deterministic(models, radiograph, heatmap) -> None:
    np.testing.assert_array_equal(gradcam_heatmap(models, radiograph[1]), heatmap)


def test_heatmap_leaves_the_classifier_as_it_was(models, radiograph) -> None:
    classifier = models.classifier
    flags = [p.requires_grad for p in classifier.parameters()]
    inplace = classifier.class_layers.relu.inplace
    hooks = _hooks(classifier)
    x = torch.rand(1, models.preprocessing.channels, models.preprocessing.input_size, models.preprocessing.input_size)
    with torch.inference_mode():
        before = classifier(x)

    with torch.inference_mode():  # as the worker's prediction runs; the heat map needs gradients anyway
        small = gradcam_heatmap(models, radiograph[1][::8, ::8])
    assert small.shape == radiograph[1][::8, ::8].shape

    assert not classifier.training
    assert [p.requires_grad for p in classifier.parameters()] == flags
    assert all(p.grad is None for p in classifier.parameters())
    assert classifier.class_layers.relu.inplace == inplace
    assert _hooks(classifier) == hooks
    with torch.inference_mode():
        torch.testing.assert_close(classifier(x), before)


def test_heatmap_of_a_small_blank_image(models) -> None:
    flat = gradcam_heatmap(models, np.zeros((64, 48), dtype=np.float32))
    assert flat.shape == (64, 48) and flat.dtype == np.float32
    assert flat.min() >= 0.0 and flat.max() <= 1.0


def test_heatmap_refuses_a_non_image(models) -> None:
    with pytest.raises(ValueError, match="2-D"):
        gradcam_heatmap(models, np.zeros((2, 64, 64), dtype=np.float32))


def test_heatmap_goes_onto_the_secondary_capture(demo_bundle, radiograph, heatmap, tmp_path) -> None:
    source, image = radiograph
    finding = ImageFinding(
        probability=0.2, threshold=0.5, flagged=False, mask=np.zeros(image.shape, dtype=bool), area_px=0, area_cm2=None
    )
    model = load_bundle(demo_bundle).identity
    path = save_dataset(build_sc(source, image, finding, model, heatmap), tmp_path / "sc.dcm")
    assert dciodvfy_errors(path) == []
    pixels = pydicom.dcmread(path).pixel_array
    assert np.ptp(pixels.astype(np.int16), axis=2).max() > 40  # the heat map tints the picture


# --- the layer Grad-CAM hooks -----------------------------------------------------------------


def test_target_layer_of_the_bundle_classifier(models) -> None:
    assert gradcam_target_layer(models.classifier, models.manifest.classifier.architecture) == "class_layers.relu"


def test_target_layer_of_resnets_and_unknown_networks() -> None:
    import timm
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    assert gradcam_target_layer(resnet, "resnet18") == "layer4"
    assert gradcam_target_layer(timm.create_model("resnet18", pretrained=False), "resnet18") == "layer4"
    # timm models name their last feature stage themselves
    assert gradcam_target_layer(timm.create_model("efficientnet_b0", pretrained=False), "efficientnet_b0") == (
        timm.create_model("efficientnet_b0", pretrained=False).feature_info[-1]["module"]
    )
    # otherwise: the last convolution or ReLU
    plain = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1)
    )
    assert gradcam_target_layer(plain, "something-new") == "3"
    with pytest.raises(ValueError, match="no layer for Grad-CAM"):
        gradcam_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 1)), "mlp")
