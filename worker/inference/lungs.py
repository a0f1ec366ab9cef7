"""Lung fields from a real segmenter: torchxrayvision's ChestX-Det PSPNet, when its weights are given.

The share of the hemithorax (:mod:`worker.inference.measure`) needs the lung fields. Without a
model they are estimated by a threshold; with ``PLEURA_LUNG_SEGMENTER_WEIGHTS`` naming the weights
file of torchxrayvision's anatomical segmenter (``baseline_models.chestx_det.PSPNet``, 14 structures,
trained on ChestX-Det; its published file is ``pspnet_chestxray_best_model_4.pth``), they are that
network's Left Lung and Right Lung masks. The network is built here from torchxrayvision's own
``pspnet`` class and filled from the file, so nothing is ever downloaded; a file that is not those
weights is refused, in one line, when the worker starts.

Input as torchxrayvision's ``PSPNet.forward`` prepares it: the decoded radiograph ([0, 1], bright =
dense; torchxrayvision's [-1024, 1024] maps back onto it), padded to a square with black (air, so
no part of the chest is cropped away), resized to 512 px (bilinear, antialiased), copied to three
channels and normalised with ImageNet's mean and standard deviation. A pixel belongs to a lung when
the sigmoid of its logit reaches 0.5. The masks come back on the image's own aspect, at most 512 px.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from config.errors import PleuraError
from contract.bundle import BundleError
from contract.networks import import_torchxrayvision, resolve_device
from worker.inference.measure import THRESHOLD_ESTIMATE as THRESHOLD_METHOD

__all__ = [
    "LUNG_SEGMENTER_METHOD", "THRESHOLD_METHOD", "LungSegmenter", "LungSegmenterError", "configured_lung_segmenter",
    "load_lung_segmenter",
]

TARGETS = (
    "Left Clavicle", "Right Clavicle", "Left Scapula", "Right Scapula", "Left Lung", "Right Lung",
    "Left Hilus Pulmonis", "Right Hilus Pulmonis", "Heart", "Aorta", "Facies Diaphragmatica",
    "Mediastinum", "Weasand", "Spine",
)
"""The PSPNet's 14 outputs, in torchxrayvision's order (``PSPNet.targets``)."""
LUNG_OUTPUTS = (TARGETS.index("Left Lung"), TARGETS.index("Right Lung"))
NATIVE_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUNG_SEGMENTER_METHOD = "lung masks of torchxrayvision's ChestX-Det lung segmenter (PSPNet)"


class LungSegmenterError(PleuraError, ValueError):
    """The lung segmenter's weights file is missing or is not those weights; one line."""


class LungSegmenter:
    """The PSPNet in eval mode on one device; :meth:`fields` gives an image's lung masks."""

    method = LUNG_SEGMENTER_METHOD

    def __init__(self, network: torch.nn.Module, device: torch.device, source: Path) -> None:
        self.network = network.to(device).eval()
        self.device = device
        self.source = source
        self._lock = threading.Lock()  # one forward pass at a time (a threads pool shares it)

    def fields(self, image: np.ndarray) -> np.ndarray | None:
        """Lung masks (both lungs) of ``image`` on a grid of its aspect, long side at most 512 px;
        None when the network finds no lung."""
        rows, columns = image.shape
        side = max(rows, columns)
        padded = np.zeros((side, side), dtype=np.float32)
        top, left = (side - rows) // 2, (side - columns) // 2
        padded[top : top + rows, left : left + columns] = np.clip(image, 0.0, 1.0)
        x = torch.from_numpy(padded)[None, None].to(self.device)
        x = F.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        x = (x.repeat(1, 3, 1, 1) - mean) / std
        with self._lock, torch.inference_mode():
            logits = self.network(x)[0, list(LUNG_OUTPUTS)]
        lungs = (torch.sigmoid(logits.float()) >= 0.5).any(dim=0).cpu().numpy()
        scale = NATIVE_SIZE / side
        r0, c0 = int(round(top * scale)), int(round(left * scale))
        r1, c1 = r0 + max(1, int(round(rows * scale))), c0 + max(1, int(round(columns * scale)))
        lungs = lungs[r0:r1, c0:c1]
        return lungs if lungs.any() else None


def _pspnet() -> torch.nn.Module:
    try:
        xrv = import_torchxrayvision()
    except BundleError:
        raise LungSegmenterError(
            "PLEURA_LUNG_SEGMENTER_WEIGHTS is set, but torchxrayvision is not installed: install Pleura with "
            "the 'pretrained' extra"
        ) from None
    return xrv.baseline_models.chestx_det.ptsemseg.pspnet.pspnet(n_classes=len(TARGETS))


_cache: dict[tuple[str, int, str], LungSegmenter] = {}
_cache_lock = threading.Lock()


def load_lung_segmenter(path: Path | str, device: str | torch.device = "cpu") -> LungSegmenter:
    """The segmenter from the weights file ``path`` (a state dict, keys with or without DataParallel's
    ``module.``, as torchxrayvision publishes it); loaded once per file and device."""
    path = Path(path)
    where = f"lung segmenter weights {path}"
    if not path.is_file():
        raise LungSegmenterError(f"{where}: no such file (PLEURA_LUNG_SEGMENTER_WEIGHTS)")
    device = torch.device(device)
    key = (str(path), path.stat().st_mtime_ns, str(device))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LungSegmenterError(f"{where}: not a readable torch weights file: {first}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise LungSegmenterError(f"{where}: holds no state dict")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        network = _pspnet()
        expected = {k: v.shape for k, v in network.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
        if missing or unexpected or wrong:
            parts = [f"{len(keys)} tensors {what} (e.g. {keys[0]})"
                     for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong))
                     if keys]
            raise LungSegmenterError(f"{where}: not the weights of torchxrayvision's ChestX-Det PSPNet: " + ", ".join(parts))
        network.load_state_dict(state, strict=True)
        segmenter = LungSegmenter(network, device, path)
        _cache[key] = segmenter
        return segmenter


def configured_lung_segmenter(settings) -> LungSegmenter | None:
    """The segmenter ``settings.lung_segmenter_weights`` names (on the worker's device), or None."""
    if settings.lung_segmenter_weights is None:
        return None
    return load_lung_segmenter(settings.lung_segmenter_weights, resolve_device(settings.device))
