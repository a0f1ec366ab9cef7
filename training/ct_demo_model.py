"""The synthetic CT demo bundle: a tiny U-Net trained on CT phantoms in a minute or two of CPU.

It goes through the same contract as a real CT model: the phantoms are written as DICOM series
with their truth as DICOM SEG (:func:`~training.ct_synthetic.write_ct_dataset`), indexed by
:func:`~training.ct_datasets.read_ct_dataset` and trained by :func:`~training.ct_trainer.train_ct`
(the code behind ``pleura train --preset ct-seg-unet-resnet50``) with a small network and a
faster learning rate. Then a held-out phantom goes through the worker's own path
(:func:`worker.ct_analysis.segment_series` and :func:`~worker.inference.ct_measure.measure_series`)
and the manifest records how far its measured volume is from the truth. The manifest says the
model is a synthetic demo, and so does everything made with it.

The phantom's pneumothorax is air (-1000 HU) against lung (-850 HU): an easy target, which is why
a tiny network learns it in seconds. It teaches nothing about patients.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from contract.bundle import Bundle, load_bundle, write_manifest
from training.ct_datasets import read_ct_dataset
from training.ct_synthetic import make_phantom, phantom_datasets
from training.ct_trainer import train_ct
from training.demo_model import ensure_bundle
from training.presets import Preset, get_preset, with_overrides
from contract.ct_preprocess import series_geometry, slice_hu
from contract.networks import load_segmenter
from training.ct_synthetic import write_ct_dataset
from worker.ct_analysis import segment_series
from worker.inference.ct_measure import measure_series

__all__ = ["CT_DEMO_NAME", "CT_DEMO_VERSION", "build_ct_demo_bundle", "ct_demo_preset", "ensure_ct_demo_bundle"]

CT_DEMO_NAME = "pleura-ct-demo"
CT_DEMO_VERSION = "0.1.0-demo"
CT_DEMO_SIZE = 128
HELD_OUT_SEED = 90_001


def ct_demo_preset(seed: int = 0) -> Preset:
    """``ct-seg-unet-resnet50``'s recipe (HU window, BCE + Jaccard, Adam) with a network small enough
    for a CPU: MONAI's BasicUNet with narrow layers (8 to 128 channels) on 128 px slices, a faster
    learning rate and 12 epochs (it reaches a validation Dice near 0.999 on the phantoms)."""
    return with_overrides(
        get_preset("ct-seg-unet-resnet50"),
        {
            "architecture": "basicunet",
            "encoder": None,
            "extra": {"features": [8, 16, 32, 64, 128, 8]},
            "input_size": CT_DEMO_SIZE,
            "batch_size": 16,
            "lr": 5e-3,
            "epochs": 12,
            "patience": 0,
            "split": [0.75, 0.25, 0.0],
            "seed": seed,
        },
    )


def is_current_ct_demo_bundle(bundle: Bundle) -> bool:
    """Whether ``bundle`` was built by this version of the CT demo recipe."""
    found, preset = bundle.manifest, ct_demo_preset()
    return (
        found.synthetic_demo
        and found.kind == "ct"
        and (found.name, found.version) == (CT_DEMO_NAME, CT_DEMO_VERSION)
        and (found.segmenter.architecture, found.segmenter.encoder) == (preset.architecture, preset.encoder)
        and found.segmenter.extra == preset.extra
        and found.preprocessing.input_size == preset.input_size
        and all(
            found.segmenter.training.get("hyperparameters", {}).get(name) == getattr(preset, name)
            for name in ("epochs", "lr", "batch_size")
        )
    )


def _held_out_volume_error(bundle: Bundle) -> dict[str, float]:
    """Measure a phantom the model never saw through the worker's path: volume error in percent."""
    phantom = make_phantom(HELD_OUT_SEED, slices=40, size=CT_DEMO_SIZE)
    datasets = phantom_datasets(phantom)
    geometry = series_geometry(datasets)
    hu = np.stack([slice_hu(datasets[i]) for i in geometry.order])
    network, device = load_segmenter(bundle, "cpu")
    probabilities = segment_series(network, device, hu, bundle, batch_size=16)
    thresholds = bundle.manifest.thresholds
    finding = measure_series(
        probabilities, hu, geometry, mask_threshold=thresholds.mask, min_volume_ml=thresholds.min_volume_ml
    )
    truth = phantom.mask_volume_ml
    return {
        "heldout_truth_volume_ml": round(truth, 2),
        "heldout_measured_volume_ml": round(finding.volume_ml, 2),
        "heldout_volume_error_percent": round(100.0 * abs(finding.volume_ml - truth) / truth, 2),
    }


def build_ct_demo_bundle(
    out_dir: Path, *, seed: int = 0, cases: int = 8, slices: int = 32, progress: bool = True
) -> Bundle:
    """Generate ``cases`` phantoms, train the demo U-Net, write the bundle to ``out_dir`` and check it."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="pleura-ct-demo-") as tmp:
        root = write_ct_dataset(Path(tmp) / "data", cases, slices=slices, size=CT_DEMO_SIZE, seed=seed)
        result = train_ct(
            ct_demo_preset(seed),
            read_ct_dataset(root),
            Path(tmp) / "run",
            device="cpu",
            name=CT_DEMO_NAME,
            version=CT_DEMO_VERSION,
            progress=progress,
        )
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(result.bundle.path, out)
    bundle = load_bundle(out)
    manifest = bundle.manifest.model_copy(deep=True)
    manifest.training_data = (
        f"{cases} synthetic CT phantoms of {slices} slices at {CT_DEMO_SIZE} px from training.ct_synthetic "
        f"(seed {seed}), truth as DICOM SEG. No patient data."
    )
    manifest.metrics.update(_held_out_volume_error(bundle))
    write_manifest(out, manifest)
    return load_bundle(out)


def ensure_ct_demo_bundle(
    target: Path, *, force: bool = False, seed: int = 0, progress: bool = True
) -> tuple[Bundle, bool]:
    """The current CT demo bundle at ``target``, built when missing or outdated: (bundle, built).
    The same lock and staging folder as the radiograph demo (:func:`training.demo_model.ensure_bundle`)."""
    return ensure_bundle(
        target,
        lambda staging: build_ct_demo_bundle(staging, seed=seed, progress=progress),
        is_current_ct_demo_bundle,
        force=force,
    )
