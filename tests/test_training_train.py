"""`pleura train`: presets, the loop (metrics, early stopping, resume) and bundles that the worker runs unchanged.

Everything here is tiny (64 px synthetic images, a few batches) so the tests stay fast on two cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from contract.bundle import load_bundle
from contract.networks import build_network, load_models
from contract.preprocess import decode_radiograph, mask_to_source
from training.datasets import read_siim
from training.presets import PRESETS, PresetError, get_preset, parse_override, with_overrides
from training.trainer import TrainingError, network_recipe, predict_network, train
from worker.inference.predict import predict_images

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = {"batch_size": 4, "steps_per_epoch": 2, "epochs": 2, "input_size": 64}
TINY_UNET = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}


def _tiny(name: str, **overrides) -> object:
    extra = {"extra": TINY_UNET} if name.startswith("seg-") else {}
    return with_overrides(get_preset(name), {**TINY, **extra, **overrides})


def _metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_preset_of_the_issue_exists_and_builds():
    assert set(PRESETS) == {
        "cls-densenet121",
        "cls-resnet50",
        "cls-densenet121-svm",
        "cls-cbr-baseline",
        "cls-resnet18",
        "seg-unet-resnet34-dicefocal",
        "seg-unet-resnet50",
        "seg-unet-efficientnet-b0",
        "seg-unet-xception",
        "seg-unet-resnet18",
        "seg-unet-vgg13",
        "ct-seg-unet-resnet50",
    }
    cbr = PRESETS["cls-cbr-baseline"]
    assert (cbr.input_size, cbr.lr, cbr.weight_decay, cbr.batch_size, cbr.loss) == (224, 5e-4, 1e-3, 64, "bce")
    assert PRESETS["cls-densenet121-svm"].loss == "squared_hinge"
    assert (
        PRESETS["seg-unet-resnet34-dicefocal"].positives_only
        and PRESETS["seg-unet-resnet34-dicefocal"].input_size == 1024
    )
    assert PRESETS["seg-unet-xception"].scheduler == "plateau" and PRESETS["seg-unet-xception"].input_size == 256
    assert all(p.encoder_weights == "none" for p in PRESETS.values())  # never a download by default
    for preset in PRESETS.values():
        small = with_overrides(preset, {"input_size": 64})
        network = build_network(_spec(small), network_recipe(small))
        with torch.inference_mode():
            output = network.eval()(torch.zeros(1, small.channels, 64, 64))
        assert output.shape == ((1, 1) if preset.task == "classify" else (1, 1, 64, 64)), preset.name


def _spec(preset):
    from training.trainer import network_spec

    return network_spec(preset, network_recipe(preset), network_recipe(preset), {})


def test_overrides_are_checked():
    preset = with_overrides(
        get_preset("cls-resnet18"), dict([parse_override("lr=3e-4"), parse_override("augment.flip_p=0.5")])
    )
    assert preset.lr == 3e-4 and preset.augment.flip_p == 0.5 and get_preset("cls-resnet18").lr == 1e-4
    with pytest.raises(PresetError, match="no such setting"):
        with_overrides(preset, {"learning_rate": 1})
    with pytest.raises(PresetError, match="a classifier takes loss"):
        with_overrides(preset, {"loss": "dice"})
    with pytest.raises(PresetError, match="for a segmenter use 'sample'"):
        with_overrides(get_preset("seg-unet-resnet50"), {"imbalance": "weight"})
    with pytest.raises(PresetError, match="unknown preset"):
        get_preset("cls-alexnet")


def test_trained_classifier_runs_unchanged_in_the_worker(synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path):
    preset = _tiny("cls-cbr-baseline", imbalance="weight", input_size=96)  # its own grid: the base has 64 px
    result = train(
        preset,
        read_siim(synthetic_siim),
        tmp_path / "run",
        base=load_bundle(tiny_base_bundle),
        cache_root=tmp_path / "cache",
        device="cpu",
        progress=False,
    )
    run = tmp_path / "run"
    rows = _metrics_rows(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"train_loss", "val_loss", "val_accuracy", "val_recall", "val_auc", "images_per_second"} <= set(rows[0])
    assert (run / "splits.csv").is_file() and (run / "checkpoints" / "best.pt").is_file()

    bundle = load_bundle(run / "bundle")
    manifest = bundle.manifest
    assert manifest.classifier.architecture == "cbr" and manifest.classifier.training["preset"] == "cls-cbr-baseline"
    assert manifest.segmenter.architecture == "unet"  # from the base bundle, with its weights
    assert manifest.synthetic_demo and "SYNTHETIC DEMO MODEL" in manifest.intended_use  # synthetic data
    assert "synthetic images" in manifest.training_data
    assert any(key.startswith("classifier_val_") for key in manifest.metrics)

    # The worker's path: load the bundle, decode with the manifest's recipe, predict.
    models = load_models(bundle, "cpu")
    paths = sorted(synthetic_siim.rglob("*.dcm"))[:4]
    datasets = [pydicom.dcmread(path) for path in paths]
    images = [decode_radiograph(ds, manifest.preprocessing) for ds in datasets]
    findings = predict_images(models, images, datasets)
    own = predict_network(result.network, [decode_radiograph(ds, result.recipe) for ds in datasets], result.recipe)
    np.testing.assert_allclose([f.probability for f in findings], own, rtol=1e-5, atol=1e-6)
    assert manifest.classifier.input is not None and manifest.classifier.input.input_size == 96

    # Grad-CAM feeds the classifier its own grid too (a 64 px input would not fit its dense layer).
    from worker.inference.heatmap import gradcam_heatmap

    heat = gradcam_heatmap(models, images[0])
    assert heat.shape == images[0].shape and 0.0 <= heat.min() and heat.max() <= 1.0

    # And the worker's whole analysis, result objects included, takes the bundle as it is.
    from worker.analysis import StudyAnalyser

    analyser = StudyAnalyser.from_bundle_dir(tmp_path / "storage", run / "bundle", device="cpu")
    key = "instances/study/series/one.dcm"
    (analyser.storage_dir / key).parent.mkdir(parents=True)
    datasets[0].save_as(analyser.storage_dir / key, enforce_file_format=True)
    summary = analyser.analyse(datasets[0].StudyInstanceUID, [{"sop_instance_uid": "one", "key": key}])
    assert summary["images"][0]["status"] == "analysed"
    assert summary["images"][0]["probability"] == pytest.approx(float(own[0]), abs=1e-5)
    assert "SR" in {item["kind"] for item in summary["results"]}
    for item in summary["results"]:
        written = pydicom.dcmread(analyser.storage_dir / item["key"])
        assert "SYNTHETIC DEMO MODEL" in written.SeriesDescription


def test_trained_unet_with_its_own_grid_and_clahe_runs_unchanged_in_the_worker(
    synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path
):
    # 96 px and CLAHE for the U-Net only: the base bundle's classifier keeps its 64 px input without CLAHE.
    preset = _tiny("seg-unet-resnet18", input_size=96, clahe=True, imbalance="sample", positives_only=False)
    result = train(
        preset,
        read_siim(synthetic_siim),
        tmp_path / "run",
        base=load_bundle(tiny_base_bundle),
        cache_root=tmp_path / "cache",
        device="cpu",
        progress=False,
    )
    assert {"val_dice", "val_iou"} <= set(_metrics_rows(tmp_path / "run")[0])
    bundle = load_bundle(tmp_path / "run" / "bundle")
    spec = bundle.manifest.segmenter
    assert spec.input is not None and spec.input.input_size == 96 and spec.input.clahe is True
    assert not bundle.manifest.preprocessing.clahe and bundle.manifest.preprocessing.input_size == 64

    models = load_models(bundle, "cpu")
    paths = sorted(synthetic_siim.rglob("*.dcm"))[:3]
    datasets = [pydicom.dcmread(path) for path in paths]
    findings = predict_images(
        models, [decode_radiograph(ds, bundle.manifest.preprocessing) for ds in datasets], datasets
    )
    own = predict_network(result.network, [decode_radiograph(ds, result.recipe) for ds in datasets], result.recipe)
    threshold = bundle.manifest.thresholds.mask
    for finding, probabilities, ds in zip(findings, own, datasets):
        expected = mask_to_source(probabilities, (ds.Rows, ds.Columns)) >= threshold
        assert np.mean(finding.mask != expected) < 1e-3


def test_a_bundle_is_a_synthetic_demo_while_any_network_is(
    synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path, monkeypatch
):
    """Classifier on "real" data with the demo's U-Net: demo; then a real U-Net beside it: not a demo."""
    import training.trainer

    monkeypatch.setattr(training.trainer, "_is_synthetic", lambda examples: False)  # pretend: patient data
    data = read_siim(synthetic_siim)
    common = dict(cache_root=tmp_path / "cache", device="cpu", progress=False)
    first = train(
        _tiny("cls-cbr-baseline", epochs=1), data, tmp_path / "cls", base=load_bundle(tiny_base_bundle), **common
    )
    assert first.bundle.manifest.synthetic_demo  # its U-Net is the synthetic base's
    assert first.bundle.manifest.segmenter.training["synthetic"] is True
    assert first.bundle.manifest.classifier.training["synthetic"] is False
    second = train(
        _tiny("seg-unet-resnet18", epochs=1),
        data,
        tmp_path / "seg",
        base=first.bundle,
        split_file=tmp_path / "cls" / "splits.csv",
        intended_use="Research use only",
        **common,
    )
    manifest = second.bundle.manifest
    assert not manifest.synthetic_demo and manifest.intended_use == "Research use only"
    assert manifest.classifier.training["preset"] == "cls-cbr-baseline"
    assert manifest.segmenter.training["preset"] == "seg-unet-resnet18"
    assert second.bundle.identity.label == f"{manifest.name} {manifest.version}"


def test_resume_continues_exactly_and_early_stopping_stops(
    synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path
):
    data, base = read_siim(synthetic_siim), load_bundle(tiny_base_bundle)
    common = dict(base=base, cache_root=tmp_path / "cache", device="cpu", progress=False)
    straight = train(_tiny("cls-cbr-baseline", epochs=2, patience=0), data, tmp_path / "straight", **common)

    train(_tiny("cls-cbr-baseline", epochs=1, patience=0), data, tmp_path / "resumed", **common)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(_tiny("cls-cbr-baseline", epochs=2, patience=0), data, tmp_path / "resumed", **common)
    with pytest.raises(TrainingError, match="other settings"):
        train(
            _tiny("cls-cbr-baseline", epochs=2, patience=0, lr=1e-2), data, tmp_path / "resumed", resume=True, **common
        )
    resumed = train(_tiny("cls-cbr-baseline", epochs=2, patience=0), data, tmp_path / "resumed", resume=True, **common)
    assert [row["epoch"] for row in _metrics_rows(tmp_path / "resumed")] == ["1", "2"]
    assert _metrics_rows(tmp_path / "resumed")[1]["val_loss"] == _metrics_rows(tmp_path / "straight")[1]["val_loss"]
    last = {
        name: torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=False)["model"]
        for name, run in (("straight", "straight"), ("resumed", "resumed"))
    }
    for key, value in last["straight"].items():
        torch.testing.assert_close(last["resumed"][key], value)
    assert resumed.best_epoch == straight.best_epoch

    # lr 0: nothing improves after the first epoch, so patience 1 stops at epoch 2 of 5.
    early = _tiny("cls-cbr-baseline", epochs=5, patience=1, lr=1e-12, monitor="loss")
    stopped = train(early, data, tmp_path / "early", **common)
    assert stopped.stopped_early and stopped.epochs_run == 2 and stopped.best_epoch == 1
    again = train(early, data, tmp_path / "early", resume=True, **common)  # stays stopped
    assert again.stopped_early and again.epochs_run == 2 and len(_metrics_rows(tmp_path / "early")) == 2


def test_train_refuses_what_cannot_work(synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path):
    data = read_siim(synthetic_siim)
    with pytest.raises(TrainingError, match="give --base"):
        train(_tiny("cls-cbr-baseline"), data, tmp_path / "a", base=None, progress=False)
    clahe_base = tmp_path / "clahe-base"
    import shutil

    shutil.copytree(tiny_base_bundle, clahe_base)
    manifest = json.loads((clahe_base / "manifest.json").read_text())
    manifest["preprocessing"]["clahe"] = True
    (clahe_base / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match="set --clahe"):
        train(_tiny("cls-cbr-baseline"), data, tmp_path / "b", base=load_bundle(clahe_base), progress=False)


def test_cli_train_and_dataset_commands(synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path):
    from pleura.cli import app
    from training.registry import Registry

    runner = CliRunner()
    checked = runner.invoke(app, ["dataset", "check", "--data", str(synthetic_siim)])
    assert checked.exit_code == 0, checked.output
    assert "24 images (12 with pneumothorax) from 12 patients" in checked.output

    split = runner.invoke(app, ["dataset", "split", "--data", str(synthetic_siim), "--out", str(tmp_path / "s.csv")])
    assert split.exit_code == 0 and (tmp_path / "s.csv").is_file(), split.output

    args = [
        "train",
        "--preset",
        "seg-unet-resnet18",
        "--data",
        str(synthetic_siim),
        "--out",
        str(tmp_path / "run"),
        "--base",
        str(tiny_base_bundle),
        "--split-file",
        str(tmp_path / "s.csv"),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--steps-per-epoch",
        "1",
        "--input-size",
        "64",
        "--set",
        json.dumps(TINY_UNET).join(["extra=", ""]),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
    ]
    trained = runner.invoke(app, [*args, "--register"], env={"PLEURA_STORAGE_DIR": str(tmp_path / "storage")})
    assert trained.exit_code == 0, trained.output
    bundle = load_bundle(tmp_path / "run" / "bundle")
    [registered] = Registry(tmp_path / "storage" / "models").read().versions.values()  # --register imported it
    assert registered.id == f"{bundle.manifest.name}/{bundle.manifest.version}" and f"imported {registered.id}" in trained.output
    assert bundle.manifest.segmenter.training["hyperparameters"]["epochs"] == 1
    assert bundle.manifest.segmenter.training["split_file"] == str(tmp_path / "s.csv")

    bad = runner.invoke(
        app,
        [
            "train",
            "--preset",
            "seg-unet-resnet18",
            "--data",
            str(synthetic_siim),
            "--base",
            str(tiny_base_bundle),
            "--set",
            "augment.spin=1",
        ],
    )
    assert bad.exit_code == 2 and "augment has no setting spin" in bad.output
    listed = runner.invoke(app, ["train", "--list-presets"])
    assert listed.exit_code == 0 and "cls-densenet121-svm" in listed.output


def test_classifier_trains_on_a_chestxray14_layout(tiny_base_bundle: Path, tmp_path: Path):
    from PIL import Image

    from training.datasets import read_cxr14
    from training.synthetic import synthetic_chest_image

    root = tmp_path / "cxr14"
    (root / "images_001" / "images").mkdir(parents=True)
    rows = ["Image Index,Finding Labels,Patient ID"]
    for index in range(16):
        positive = (index // 2) % 2 == 0  # 8 patients of two images, half of them positive
        pixels, _ = synthetic_chest_image(100 + index, positive, 64)
        Image.fromarray((pixels >> 4).astype(np.uint8)).save(root / "images_001" / "images" / f"{index:08d}_000.png")
        rows.append(f"{index:08d}_000.png,{'Pneumothorax|Effusion' if positive else 'No Finding'},{index // 2}")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    result = train(
        _tiny("cls-cbr-baseline", epochs=1),
        read_cxr14(root),
        tmp_path / "run",
        base=load_bundle(tiny_base_bundle),
        cache_root=tmp_path / "cache",
        device="cpu",
        progress=False,
    )
    manifest = result.bundle.manifest
    assert manifest.classifier.architecture == "cbr"
    assert "ChestX-ray14 layout" in manifest.classifier.training["data"]
    assert not manifest.classifier.training["synthetic"]  # PNGs carry no synthetic marker ...
    assert manifest.synthetic_demo  # ... but the U-Net is the synthetic base's


def test_cli_trains_both_networks_of_a_bundle(synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path):
    from pleura.cli import app

    args = [
        "train", "--preset", "cls-cbr-baseline", "--preset", "seg-unet-resnet18", "--data", str(synthetic_siim),
        "--out", str(tmp_path / "run"), "--base", str(tiny_base_bundle), "--epochs", "1", "--batch-size", "4",
        "--steps-per-epoch", "1", "--input-size", "64", "--set", "extra.encoder_depth=3",
        "--set", "extra.decoder_channels=[16, 8, 4]", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
    ]
    # The classifier preset takes no U-Net arguments: one extra for both presets does not fit.
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "cbr" in refused.output

    args = [a for a in args if not a.startswith(("extra.", "--set"))]
    trained = CliRunner().invoke(app, args)
    assert trained.exit_code == 0, trained.output
    final = load_bundle(tmp_path / "run" / "seg-unet-resnet18" / "bundle")
    assert final.manifest.classifier.training["preset"] == "cls-cbr-baseline"
    assert final.manifest.segmenter.training["preset"] == "seg-unet-resnet18"
    assert final.manifest.segmenter.training["split_file"] == str(tmp_path / "run" / "cls-cbr-baseline" / "splits.csv")
    assert final.manifest.synthetic_demo  # synthetic data
    resumed = CliRunner().invoke(app, [*args, "--resume"])  # a finished run resumes to the same bundle
    assert resumed.exit_code == 0, resumed.output
    assert len(_metrics_rows(tmp_path / "run" / "seg-unet-resnet18")) == 1
