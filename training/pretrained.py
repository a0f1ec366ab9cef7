"""Published chest X-ray classifiers as Pleura bundles, for sites without a training set of their own.

`pleura models fetch NAME` builds a classifier-only bundle around one of torchxrayvision's
multi-label classifiers (Cohen et al.): the network is the contract's ``xrv-densenet121`` or
``xrv-resnet50`` architecture (``contract/networks.py``), its weights are the published ones copied
into the bundle as a plain state dict, its output is the Pneumothorax label, and the manifest carries
torchxrayvision's own preprocessing (centre crop, [-1024, 1024], scikit-image resize), the data sets
it was trained on, the licence and a "research use; validate locally" intended use. The bundle is
then imported into the registry like any version; nothing is promoted.

The weights come from torchxrayvision's own download (online), or from a copy of the same file
(``--from-file``, offline). Either way the file is checked against the named model before anything
is written: every tensor of the architecture must be there with its shape, no other may be, and
the file's SHA-256 is recorded (torchxrayvision publishes no checksum to compare with).
"""

from __future__ import annotations

import collections
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from config.errors import PleuraError
from contract.bundle import Manifest, NetworkSpec, NetworkInput, Preprocessing, Thresholds, write_manifest
from contract.bundle import BundleError
from contract.networks import build_network, import_torchxrayvision

__all__ = [
    "PRETRAINED",
    "PretrainedError",
    "PretrainedModel",
    "build_pretrained_bundle",
    "download_weights",
    "fetch_pretrained",
    "read_published_weights",
]

INTENDED_USE = (
    "research use; validate locally: a published classifier trained elsewhere, not validated at this "
    "site - tune its threshold on local data (pleura tune) and evaluate it before any use"
)
LICENCE = (
    "torchxrayvision, Apache License 2.0 (https://github.com/mlmed/torchxrayvision); the weights were "
    "trained on public data sets whose own terms of use apply (e.g. NIH ChestX-ray14, PadChest, CheXpert, "
    "MIMIC-CXR: research use, credentialed access for MIMIC) - read them before any use beyond research"
)
TARGET_LABEL = "Pneumothorax"
WEIGHTS_FILE = "classifier.pt"


class PretrainedError(PleuraError, ValueError):
    """A published model cannot be fetched or its weights file is not that model's; one line."""


@dataclass(frozen=True)
class PretrainedModel:
    """One of torchxrayvision's weight sets that has a Pneumothorax output."""

    name: str
    """torchxrayvision's weights name, e.g. ``densenet121-res224-all``."""
    architecture: str
    """The contract's architecture (``contract/networks.py``)."""
    input_size: int
    training_data: str

    def published(self) -> dict:
        """torchxrayvision's own entry for these weights: labels, weights URL, operating points."""
        xrv_models = _xrv_models()
        entry = xrv_models.model_urls.get(self.name)
        if entry is None:  # pragma: no cover - the installed torchxrayvision dropped it
            raise PretrainedError(f"the installed torchxrayvision has no weights named {self.name!r}")
        return entry

    @property
    def labels(self) -> list[str]:
        return list(self.published()["labels"])

    @property
    def output_index(self) -> int:
        return self.labels.index(TARGET_LABEL)

    @property
    def file_name(self) -> str:
        """The file torchxrayvision downloads (and keeps in ``~/.torchxrayvision/models_data/``)."""
        return self.published()["weights_url"].rsplit("/", 1)[-1]

    def spec(self) -> NetworkSpec:
        return NetworkSpec(
            architecture=self.architecture,
            weights_file=WEIGHTS_FILE,
            extra={"num_classes": len(self.labels), "output_index": self.output_index},
            input=NetworkInput(input_size=self.input_size, channels=1, normalisation="range",
                               value_range=(-1024.0, 1024.0), crop="centre_square", resize="skimage"),
            training={"source": "torchxrayvision", "weights": self.name, "labels": self.labels,
                      "output": TARGET_LABEL, "data": self.training_data},
        )


_ALL = "NIH ChestX-ray14, PadChest, CheXpert, MIMIC-CXR, Google (NIH subset), OpenI, RSNA Pneumonia"
PRETRAINED: dict[str, PretrainedModel] = {
    model.name: model
    for model in (
        PretrainedModel("densenet121-res224-all", "xrv-densenet121", 224, _ALL),
        PretrainedModel("densenet121-res224-nih", "xrv-densenet121", 224, "NIH ChestX-ray14"),
        PretrainedModel("densenet121-res224-pc", "xrv-densenet121", 224, "PadChest"),
        PretrainedModel("densenet121-res224-chex", "xrv-densenet121", 224, "CheXpert"),
        PretrainedModel("densenet121-res224-mimic_nb", "xrv-densenet121", 224, "MIMIC-CXR (NegBio labels)"),
        PretrainedModel("densenet121-res224-mimic_ch", "xrv-densenet121", 224, "MIMIC-CXR (CheXpert labels)"),
        PretrainedModel("resnet50-res512-all", "xrv-resnet50", 512,
                        "PadChest, NIH ChestX-ray14, RSNA Pneumonia, SIIM-ACR Pneumothorax, VinDr-CXR"),
    )
}
"""The weight sets `pleura models fetch` knows: torchxrayvision's, those with a Pneumothorax output."""


def _xrv_models():
    try:
        return import_torchxrayvision().models
    except BundleError:
        raise PretrainedError("fetching published models needs torchxrayvision: pip install 'pleura[pretrained]'") from None


def pretrained_model(name: str) -> PretrainedModel:
    model = PRETRAINED.get(name)
    if model is None:
        raise PretrainedError(f"unknown pretrained model {name!r} (known: {', '.join(PRETRAINED)})")
    return model


def download_weights(name: str) -> Path:
    """The weights file of ``name`` by torchxrayvision's own download (online; kept in its cache)."""
    model = pretrained_model(name)
    try:
        return Path(_xrv_models().get_weights(model.name))
    except PretrainedError:
        raise
    except Exception as exc:
        raise PretrainedError(
            f"cannot download {name} ({type(exc).__name__}: {exc}); offline, copy {model.file_name} from "
            f"{model.published()['weights_url']} and use --from-file"
        ) from None


def _allowed_globals() -> list:
    """What a published DenseNet file may unpickle: torchxrayvision saved whole modules, so their
    classes are allowed by name (torch's weights-only loader runs no other code)."""
    xrv_models = _xrv_models()
    return [xrv_models.DenseNet, xrv_models._DenseBlock, xrv_models._DenseLayer, xrv_models._Transition,
            nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear, nn.Sequential,
            collections.OrderedDict, set]


def read_published_weights(model: PretrainedModel, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``model``'s network from a published weights file (a state dict, or a whole
    pickled torchxrayvision module), checked tensor by tensor against the architecture."""
    if not path.is_file():
        raise PretrainedError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except PretrainedError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretrainedError(f"{path} is not a readable torch weights file of {model.name}: {first}") from None
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path} holds no state dict of {model.name}")
    state = {key.removeprefix("module."): value for key, value in state.items() if key != "op_threshs"}
    expected = {key: value.shape for key, value in _network(model).net.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} tensors {what} (e.g. {keys[0]})")
        raise PretrainedError(f"{path} is not the weights of {model.name} ({model.architecture}): " + ", ".join(parts))
    return state


def _network(model: PretrainedModel) -> nn.Module:
    spec = model.spec()
    return build_network(spec, Preprocessing().model_copy(update=spec.input.model_dump(exclude_none=True)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_pretrained_bundle(name: str, weights: Path, out_dir: Path) -> Path:
    """A classifier-only bundle in ``out_dir`` around ``name``'s published weights file ``weights``."""
    model = pretrained_model(name)
    weights = Path(weights)
    state = read_published_weights(model, weights)
    digest = sha256_of(weights)
    entry = model.published()
    thresholds = entry.get("op_threshs")
    start = float(thresholds[model.output_index]) if thresholds is not None else 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({f"net.{key}": value.contiguous() for key, value in state.items()}, out_dir / WEIGHTS_FILE)
    manifest = Manifest(
        name=f"xrv-{model.name}",
        version=f"w{digest[:12]}",  # the same file gives the same version: fetching twice adds nothing
        intended_use=INTENDED_USE,
        synthetic_demo=False,
        preprocessing=Preprocessing(voi="dicom", invert_monochrome1=True, clahe=False),
        classifier=model.spec(),
        segmenter=None,
        thresholds=Thresholds(probability=start if 0 < start < 1 else 0.5, min_area_px=0),
        training_data=model.training_data,
        licence=LICENCE,
        provenance={"source": "torchxrayvision", "weights": model.name, "url": entry["weights_url"],
                    "file": model.file_name, "sha256": digest,
                    "description": entry.get("description", "")},
        tuning={"status": "not tuned at this site",
                "probability": "torchxrayvision's published operating point for Pneumothorax, a starting point "
                               "only: tune it on local data (pleura tune --min-sensitivity)"},
    )
    write_manifest(out_dir, manifest)
    return out_dir


def fetch_pretrained(registry, name: str, from_file: Path | None = None, by: str | None = None):
    """Build ``name``'s bundle (weights from ``from_file``, else torchxrayvision's download) and import
    it into ``registry`` (a :class:`training.registry.Registry`): (record, newly added). A refused file
    leaves the registry, and so the active model, as it was."""
    model = pretrained_model(name)
    weights = Path(from_file) if from_file is not None else download_weights(model.name)
    with tempfile.TemporaryDirectory(prefix="pleura-fetch-") as tmp:
        bundle = build_pretrained_bundle(model.name, weights, Path(tmp) / f"xrv-{model.name}")
        try:
            return registry.import_bundle(bundle, by=by)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
