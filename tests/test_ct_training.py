"""`pleura train` with the CT preset: a few steps on phantom series with DICOM SEG truth and with
NIfTI truth, the metrics the recipe reports, and a CT bundle the worker loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contract.bundle import load_bundle
from pleura.cli import app
from training.ct_datasets import load_case, read_ct_dataset
from training.ct_synthetic import write_ct_dataset
from training.datasets import DatasetError
from training.presets import get_preset

TINY = [
    "--set", "encoder=resnet18", "--set", 'extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}',
    "--input-size", "64", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "4", "--device", "cpu",
]
METRICS = ("dice", "iou", "mean_iou", "precision", "recall", "pixel_accuracy", "auc")


def test_the_ct_preset_follows_the_published_recipe() -> None:
    preset = get_preset("ct-seg-unet-resnet50")
    assert (preset.kind, preset.architecture, preset.encoder, preset.input_size) == ("ct", "unet", "resnet50", 512)
    assert (preset.loss, preset.optimiser, preset.lr, preset.patience) == ("jaccard_bce", "adam", 1e-4, 8)
    assert preset.split == (0.64, 0.16, 0.20) and preset.hu_window is not None


@pytest.mark.parametrize("mask_format", ["seg", "nifti"])
def test_training_on_ct_series_writes_a_ct_bundle_with_the_metrics(tmp_path: Path, mask_format: str) -> None:
    data = write_ct_dataset(tmp_path / "data", 5, slices=8, size=64, mask_format=mask_format, seed=2)
    index = read_ct_dataset(data)
    assert {case.mask_format for case in index.cases} == {mask_format}
    case = load_case(index.cases[0])
    assert case.mask.shape == case.hu.shape and case.mask.any()

    result = CliRunner().invoke(
        app, ["train", "--preset", "ct-seg-unet-resnet50", "--data", str(data), "--out", str(tmp_path / "run"), *TINY]
    )
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "run" / "bundle")
    manifest = bundle.manifest
    assert manifest.kind == "ct" and manifest.classifier is None and manifest.synthetic_demo
    assert manifest.preprocessing.hu_window == (-600.0, 1500.0)
    for name in METRICS:
        value = manifest.metrics[f"segmenter_val_{name}"]
        assert 0.0 <= value <= 1.0, (name, value)
    assert manifest.segmenter.training["hyperparameters"]["loss"] == "jaccard_bce"
    splits = (tmp_path / "run" / "splits.csv").read_text().splitlines()[1:]
    assert sorted(row.rsplit(",", 1)[1] for row in splits) == ["test", "train", "train", "train", "val"]  # 64/16/20
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert all(f"val_{name}" in header for name in METRICS)
    json.loads((tmp_path / "run" / "run.json").read_text())


def test_a_nifti_mask_on_another_grid_is_refused_with_the_fix(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    data = write_ct_dataset(tmp_path / "data", 1, slices=6, size=32, mask_format="nifti", seed=3)
    [case] = read_ct_dataset(data).cases
    image = nib.load(str(case.mask_path))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::2, ::2], image.affine @ np.diag([2, 2, 1, 1])), case.mask_path)
    with pytest.raises(DatasetError, match="resample the mask"):
        load_case(case)


def test_a_case_without_a_mask_names_the_folder(tmp_path: Path) -> None:
    data = write_ct_dataset(tmp_path / "data", 2, slices=6, size=32, seed=4)
    missing = sorted(p for p in data.iterdir())[0]
    (missing / "segmentation.dcm").unlink()
    with pytest.raises(DatasetError, match=f"{missing.name}.*exactly one truth mask"):
        read_ct_dataset(data)
    assert len(read_ct_dataset(data, skip_bad=True).cases) == 1


def test_a_manifest_checks_its_networks_against_its_kind() -> None:
    from pydantic import ValidationError

    from contract.bundle import Manifest, NetworkSpec, Preprocessing

    unet = NetworkSpec(architecture="unet", weights_file="segmenter.pt")
    common = dict(name="m", version="1", intended_use="test", synthetic_demo=True, segmenter=unet)
    ct = Manifest(kind="ct", preprocessing=Preprocessing(hu_window=(-600, 1500)), **common)
    assert ct.networks == [unet]
    with pytest.raises(ValidationError, match="needs a classifier"):
        Manifest(**common)  # a radiograph bundle
    with pytest.raises(ValidationError, match="segments only"):
        Manifest(kind="ct", preprocessing=Preprocessing(hu_window=(-600, 1500)), classifier=unet, **common)
    with pytest.raises(ValidationError, match="hu_window"):
        Manifest(kind="ct", **common)
