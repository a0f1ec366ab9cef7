"""The ONNX Runtime path for the CPU (``inference_backend`` ``auto``, the default, or ``onnxruntime``).

A bundle's two networks are exported to ONNX, by a child process (the exporter's leftovers would
slow the worker for its whole life), the first time a worker needs them, into
``<storage_dir>/onnx-cache/<key>/``, where the key is a SHA-256 of the weights file, the network's
spec and its input recipe: a new model version (or a retrained file) gets new files, and the bundle
itself is never written to (it may be read-only, and its checksums are checked at import). The
export goes to a temporary name and is renamed into place, so workers sharing the storage never see
half a file. The torch networks stay loaded: Grad-CAM needs their gradients.

ONNX Runtime runs only on the CPU here; on CUDA the torch path (mixed precision, channels-last)
is used whatever this setting says.

``auto`` measures instead of guessing: which of torch and ONNX Runtime is faster depends on the
network and the CPU (on a 2-core x86 host ONNX Runtime ran a DenseNet-121 and a ResNet-34 U-Net
three times as fast as torch, and the demo bundle's small networks no faster; docs/benchmarks.md).
For each network it times one image through both, once per host and exported file, keeps ONNX
Runtime only when it is clearly faster (:data:`AUTO_MARGIN`), and records the measurement beside
the export (``backend-choice.json``) so later workers on the host skip it. A network that cannot be
exported, or a host without ONNX Runtime, stays on torch, with the reason in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contract.bundle import Bundle, NetworkSpec, Preprocessing, load_bundle
from contract.networks import LoadedModels, load_models

__all__ = ["AUTO_MARGIN", "OnnxNetwork", "auto_networks", "export_key", "forward_seconds", "onnx_networks"]

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "logits"
AUTO_MARGIN = 1.1
"""``auto`` runs a network by ONNX Runtime only when torch takes at least this many times as long
(torch is the path training and evaluation use, so it keeps near-ties)."""
CHOICE_FILE = "backend-choice.json"

Network = Callable[[torch.Tensor], torch.Tensor]


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
        # ONNX Runtime's threads spin for a while after each run by default: the worker's own
        # decoding, measuring and writing then compete with them for the same cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


ROLES = ("classifier", "segmenter")
EXPORT_TIMEOUT_SECONDS = 3600


def onnx_networks(bundle: Bundle, cache_dir: Path) -> tuple[OnnxNetwork, OnnxNetwork]:
    """(classifier, segmenter) run by ONNX Runtime, exported into ``cache_dir`` by a child process
    (:func:`export_in_child`) when not there yet."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "inference_backend onnxruntime (PLEURA_INFERENCE_BACKEND) needs ONNX Runtime, which is not "
            "installed: reinstall pleura (it depends on onnxruntime), or set inference_backend to torch"
        ) from None
    manifest = bundle.manifest
    paths = {}
    for role in ROLES:
        spec = getattr(manifest, role)
        key = export_key(bundle, spec, manifest.network_preprocessing(spec))
        paths[role] = cache_dir / key / f"{Path(spec.weights_file).stem}.onnx"
    missing = {role: path for role, path in paths.items() if not path.exists()}
    if missing:
        log.info("exporting the %s of %s to ONNX into %s", " and ".join(missing), bundle.identity.label, cache_dir)
        export_in_child(bundle, missing)
    threads = torch.get_num_threads()
    return OnnxNetwork(paths["classifier"], threads), OnnxNetwork(paths["segmenter"], threads)


def export_in_child(bundle: Bundle, targets: dict[str, Path]) -> None:
    """Export the bundle's networks named in ``targets`` (role -> .onnx path) in a child process.

    The exporter (torch.export, onnxscript) leaves hundreds of thousands of Python objects in the
    process that ran it and needs far more memory than inference. In a worker they would stay for
    its whole life and slow every later full garbage collection: measured on the demo bundle, the
    worker's full analysis lost a sixth of its speed that way.
    """
    command = [sys.executable, "-m", __name__, str(bundle.path)]
    for role, target in targets.items():
        command += [role, str(target)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"exporting {bundle.identity.label} to ONNX took over {EXPORT_TIMEOUT_SECONDS} s") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"cannot export {bundle.identity.label} to ONNX: {reason}")


def _export_bundle_networks(arguments: list[str]) -> None:
    """The child process of :func:`export_in_child`: BUNDLE_DIR (ROLE TARGET)..."""
    bundle = load_bundle(arguments[0])
    models = load_models(bundle, "cpu")
    for role, target in zip(arguments[1::2], arguments[2::2]):
        if role not in ROLES:
            raise SystemExit(f"unknown network {role!r}: use {' or '.join(ROLES)}")
        spec = getattr(bundle.manifest, role)
        _export(getattr(models, role), bundle.manifest.network_preprocessing(spec), Path(target))


def forward_seconds(network: Network, example: torch.Tensor, repeats: int = 2) -> float:
    """Best time of ``repeats`` calls of ``network`` on ``example``, after one call to warm it up."""
    best = float("inf")
    with torch.inference_mode():
        network(example)
        for _ in range(repeats):
            start = time.perf_counter()
            network(example)
            best = min(best, time.perf_counter() - start)
    return best


def _host_key() -> str:
    """What the measurement depends on besides the exported file: the CPU and the thread count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} / {os.cpu_count()} CPUs / {torch.get_num_threads()} threads / onnxruntime {_onnxruntime_version()}"


def _onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _read_choices(path: Path) -> dict:
    try:
        choices = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return choices if isinstance(choices, dict) else {}


def _write_choices(path: Path, choices: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".json.partial")
    with os.fdopen(handle, "w") as file:
        json.dump(choices, file, indent=2, sort_keys=True)
    os.replace(temporary, path)


def auto_networks(
    models: LoadedModels, bundle: Bundle, cache_dir: Path, timer: Callable[[Network, torch.Tensor], float] = forward_seconds
) -> tuple[tuple[Network, Network], tuple[str, str]]:
    """(classifier, segmenter) each run by whichever of torch and ONNX Runtime is faster on this
    host (see the module's docstring), and the name of each one's backend."""
    torch_networks: tuple[Network, Network] = (models.classifier, models.segmenter)
    try:
        exported = onnx_networks(bundle, cache_dir)
    except Exception as exc:  # ONNX Runtime not installed, or a network the exporter cannot take
        log.warning("inference_backend auto: torch runs the networks (ONNX Runtime not usable: %s)", exc)
        return torch_networks, ("torch", "torch")
    manifest = bundle.manifest
    host = _host_key()
    chosen: list[Network] = []
    names: list[str] = []
    for spec, by_torch, by_onnx in zip((manifest.classifier, manifest.segmenter), torch_networks, exported):
        record = by_onnx.path.parent / CHOICE_FILE
        choices = _read_choices(record)
        choice = choices.get(host)
        if not isinstance(choice, dict) or choice.get("backend") not in ("torch", "onnxruntime"):
            recipe = manifest.network_preprocessing(spec)
            example = torch.zeros(1, recipe.channels, recipe.input_size, recipe.input_size)
            torch_s, onnx_s = timer(by_torch, example), timer(by_onnx, example)
            backend = "onnxruntime" if torch_s >= AUTO_MARGIN * onnx_s else "torch"
            choice = {"backend": backend, "torch_seconds": round(torch_s, 6), "onnxruntime_seconds": round(onnx_s, 6)}
            _write_choices(record, {**_read_choices(record), host: choice})
        log.info(
            "inference_backend auto: %s of %s runs on %s (one image: torch %.1f ms, ONNX Runtime %.1f ms)",
            spec.weights_file, bundle.identity.label, choice["backend"], 1000 * float(choice["torch_seconds"]),
            1000 * float(choice["onnxruntime_seconds"]),
        )
        chosen.append(by_onnx if choice["backend"] == "onnxruntime" else by_torch)
        names.append(choice["backend"])
    return (chosen[0], chosen[1]), (names[0], names[1])


if __name__ == "__main__":
    _export_bundle_networks(sys.argv[1:])
