"""The optional ONNX Runtime path for the CPU (``inference_backend = "onnxruntime"``).

A bundle's two networks are exported to ONNX the first time a worker needs them, into
``<storage_dir>/onnx-cache/<key>/``, where the key is a SHA-256 of the weights file, the network's
spec and its input recipe: a new model version (or a retrained file) gets new files, and the bundle
itself is never written to (it may be read-only, and its checksums are checked at import). The
export goes to a temporary name and is renamed into place, so workers sharing the storage never see
half a file. The torch networks stay loaded: Grad-CAM needs their gradients.

ONNX Runtime runs only on the CPU here; on CUDA the torch path (mixed precision, channels-last)
is used whatever this setting says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.bundle import Bundle, NetworkSpec, Preprocessing
from worker.inference.models import LoadedModels

__all__ = ["OnnxNetwork", "export_key", "onnx_networks"]

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "logits"


def export_key(bundle: Bundle, spec: NetworkSpec, recipe: Preprocessing) -> str:
    """What the exported file depends on: the weights' bytes, the network spec and its input recipe."""
    digest = hashlib.sha256()
    with open(bundle.weights_path(spec), "rb") as weights:
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps([spec.model_dump(mode="json"), recipe.model_dump(mode="json"), torch.__version__],
                             sort_keys=True).encode())
    return digest.hexdigest()[:32]


class OnnxNetwork:
    """An exported network run by ONNX Runtime, called like the torch module it replaces:
    a CPU tensor (N, C, H, W) in, a tensor of logits out."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.path = path
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: array})[0])


def _export(network: nn.Module, recipe: Preprocessing, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, recipe.channels, recipe.input_size, recipe.input_size)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".onnx.partial")
    os.close(handle)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals
            torch.onnx.export(
                network.cpu().eval(), (example,), temporary, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=True, verbose=False,
                external_data=False,
            )
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def onnx_networks(models: LoadedModels, bundle: Bundle, cache_dir: Path) -> tuple[OnnxNetwork, OnnxNetwork]:
    """(classifier, segmenter) run by ONNX Runtime, exported into ``cache_dir`` when not there yet."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "inference_backend onnxruntime (PLEURA_INFERENCE_BACKEND) needs ONNX Runtime: "
            "pip install 'pleura[onnx]', or set it to torch"
        ) from None
    manifest = bundle.manifest
    networks = []
    for spec, network in ((manifest.classifier, models.classifier), (manifest.segmenter, models.segmenter)):
        recipe = manifest.network_preprocessing(spec)
        path = cache_dir / export_key(bundle, spec, recipe) / f"{Path(spec.weights_file).stem}.onnx"
        if not path.exists():
            log.info("exporting %s of %s to ONNX: %s", spec.weights_file, bundle.identity.label, path)
            _export(network, recipe, path)
        networks.append(OnnxNetwork(path, torch.get_num_threads()))
    return networks[0], networks[1]
