"""Published classifiers (torchxrayvision) as classifier-only bundles, without the internet.

The published weights stand in as the same architectures with seeded random weights, saved the way
torchxrayvision publishes them (a whole pickled DenseNet; a ResNet-50 state dict). `pleura models
fetch --from-file` must turn them into bundles, refuse any other file with the active model kept,
and the worker must run the bundle unchanged on a real radiograph and give what torchxrayvision's
own model gives on its own documented preprocessing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from config.settings import load_settings
from contract.active import active_bundle_dir
from contract.bundle import MANIFEST_NAME, load_bundle
from contract.networks import import_torchxrayvision
from contract.preprocess import decode_radiograph
from dicom_samples import dciodvfy_errors, pydicom_data_file
from pleura.cli import app
from services import write_config
from training.pretrained import PRETRAINED, PretrainedError, build_pretrained_bundle
from training.registry import Registry
from worker.analysis import StudyAnalyser
from worker.inference.predict import network_outputs

xrv = import_torchxrayvision()  # without the sys.path entries its baseline models add
DENSENET = "densenet121-res224-all"
RESNET = "resnet50-res512-all"


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Path]:
    """Stand-ins for the published files, and the seeded torchxrayvision DenseNet itself."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(22)
    densenet = xrv.models.DenseNet(weights=None).eval()
    torch.save(densenet, folder / PRETRAINED[DENSENET].file_name)  # as torchxrayvision publishes it
    resnet = torchvision.models.resnet50(num_classes=18, weights=None)
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.save(resnet.state_dict(), folder / PRETRAINED[RESNET].file_name)
    truncated = folder / "truncated.pt"
    truncated.write_bytes((folder / PRETRAINED[DENSENET].file_name).read_bytes()[:100_000])
    return {
        "densenet": folder / PRETRAINED[DENSENET].file_name,
        "resnet": folder / PRETRAINED[RESNET].file_name,
        "truncated": truncated,
        "model": densenet,
    }


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path / "pleura.toml", storage_dir=tmp_path / "storage", device="cpu")


def run(config: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--config", str(config)], env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return result.output


def test_fetch_from_file_imports_a_bundle_and_refuses_other_files(config, published):
    out = run(config, "models", "fetch", DENSENET, "--from-file", str(published["densenet"]))
    assert "imported xrv-densenet121-res224-all/w" in out and "research use" in out
    settings = load_settings(config)
    registry = Registry(settings.storage_dir / "models")
    [record] = registry.read().versions.values()
    assert active_bundle_dir(settings) == settings.storage_dir / "models" / "demo"  # fetched, not promoted
    run(config, "models", "promote", record.id)
    active = active_bundle_dir(settings)

    manifest = load_bundle(active).manifest
    assert manifest.classifier_only and manifest.segmenter is None
    assert manifest.classifier.architecture == "xrv-densenet121"
    assert manifest.classifier.extra["output_index"] == xrv.models.model_urls[DENSENET]["labels"].index("Pneumothorax") == 3
    recipe = manifest.network_preprocessing(manifest.classifier)
    assert (recipe.input_size, recipe.channels, recipe.crop, recipe.resize, recipe.value_range) == (
        224, 1, "centre_square", "skimage", (-1024.0, 1024.0))
    assert manifest.intended_use.startswith("research use; validate locally")
    assert "Apache" in manifest.licence and "MIMIC-CXR" in manifest.training_data
    assert manifest.thresholds.probability == pytest.approx(xrv.models.model_urls[DENSENET]["op_threshs"][3])
    assert manifest.tuning["status"] == "not tuned at this site"
    assert manifest.provenance["file"] == published["densenet"].name and len(manifest.provenance["sha256"]) == 64

    # Another architecture's weights, a truncated file: one line saying why; the active model stays.
    wrong = run(config, "models", "fetch", DENSENET, "--from-file", str(published["resnet"]), code=2)
    assert f"is not the weights of {DENSENET}" in wrong and "tensors missing" in wrong
    assert len(wrong.strip().splitlines()) == 1
    truncated = run(config, "models", "fetch", DENSENET, "--from-file", str(published["truncated"]), code=2)
    assert "is not a readable torch weights file" in truncated and len(truncated.strip().splitlines()) == 1
    unknown = run(config, "models", "fetch", "densenet121-res224-rsna", "--from-file", str(published["densenet"]), code=2)
    assert "unknown pretrained model" in unknown
    assert active_bundle_dir(settings) == active and len(registry.read().versions) == 1

    # The ResNet-50 weight set: its own file is accepted (512 px input), the DenseNet's is not.
    run(config, "models", "fetch", RESNET, "--from-file", str(published["densenet"]), code=2)
    run(config, "models", "fetch", RESNET, "--from-file", str(published["resnet"]))
    resnet = next(r for r in registry.read().versions.values() if r.name == f"xrv-{RESNET}")
    resnet_manifest = load_bundle(registry.version_dir(resnet)).manifest
    assert resnet_manifest.network_preprocessing(resnet_manifest.classifier).input_size == 512
    assert active_bundle_dir(settings) == active
    # Fetching the same file again adds nothing.
    assert "already registered" in run(config, "models", "fetch", DENSENET, "--from-file", str(published["densenet"]))


def _torchxrayvision_probability(model: torch.nn.Module, image: np.ndarray) -> float:
    """torchxrayvision's documented pipeline on a decoded radiograph ([0, 1], bright = dense)."""
    img = xrv.datasets.normalize(image, 1)
    if img.ndim == 3:
        img = img.mean(2)
    img = img[None, ...]
    img = xrv.datasets.XRayCenterCrop()(img)
    img = xrv.datasets.XRayResizer(224)(img)
    with torch.no_grad():
        logits = model(torch.from_numpy(img)[None])
    return float(torch.sigmoid(logits[0, model.pathologies.index("Pneumothorax")
                                      if hasattr(model, "pathologies") else 3]))


def _store(storage: Path, source: Path) -> dict[str, str]:
    ds = pydicom.dcmread(source)
    key = f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    (storage / key).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, storage / key)
    return {"sop_instance_uid": str(ds.SOPInstanceUID), "key": key}


def test_the_worker_runs_the_bundle_as_torchxrayvision_does_on_a_real_radiograph(tmp_path, published):
    bundle_dir = build_pretrained_bundle(DENSENET, published["densenet"], tmp_path / "bundle")
    source = pydicom_data_file("RG1_UNCR.dcm")
    dataset = pydicom.dcmread(source)
    assert dataset.Rows != dataset.Columns  # the centre crop matters on this image

    analyser = StudyAnalyser.from_bundle_dir(tmp_path / "storage", bundle_dir, device="cpu")
    image = decode_radiograph(dataset, analyser.bundle.manifest.preprocessing)
    expected = _torchxrayvision_probability(published["model"], image)
    probabilities, maps = network_outputs(analyser.models, [image])
    assert abs(float(probabilities[0]) - expected) < 1e-5
    assert maps.shape == (1, 1, 1) and not maps.any()  # no U-Net: no mask

    item = _store(analyser.storage_dir, source)
    summary = analyser.analyse(str(dataset.StudyInstanceUID), [item])
    [entry] = summary["images"]
    assert entry["status"] == "analysed" and abs(entry["probability"] - expected) < 1e-5
    flagged = expected >= analyser.bundle.manifest.thresholds.probability
    assert entry["flagged"] is flagged and "classifier only" in entry["reason"]
    assert sorted(r["kind"] for r in summary["results"]) == ["GSPS", "SC", "SR"]


def test_a_flagged_image_without_a_segmenter_gets_a_gradcam_region_and_no_seg(tmp_path, published):
    bundle_dir = build_pretrained_bundle(DENSENET, published["densenet"], tmp_path / "bundle")
    manifest_file = bundle_dir / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    manifest["thresholds"]["probability"] = 0.0  # every image flagged: the path under test
    manifest_file.write_text(json.dumps(manifest))
    analyser = StudyAnalyser.from_bundle_dir(tmp_path / "storage", bundle_dir, device="cpu")
    source = pydicom_data_file("RG1_UNCR.dcm")
    item = _store(analyser.storage_dir, source)
    summary = analyser.analyse(str(pydicom.dcmread(source).StudyInstanceUID), [item], {"sc_heatmap": True})

    assert summary["flagged"] is True and summary["images"][0]["area_px"] == 0
    results = {r["kind"]: analyser.storage_dir / r["key"] for r in summary["results"]}
    assert sorted(results) == ["GSPS", "SC", "SR"]  # no SEG: there is no segmentation
    for path in results.values():
        assert dciodvfy_errors(path) == [], path.name

    sr = hd.sr.srread(results["SR"])
    assert sr.content.get_planar_roi_measurement_groups() == []
    [group] = sr.content.get_image_measurement_groups()
    evaluations = {item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0].CodeMeaning
                   for item in group[0].ContentSequence if item.ValueType == "CODE"}
    assert evaluations["Pneumothorax"] == "Present"
    comments = [i.TextValue for i in sr.content[0].ContentSequence if i.ValueType == "TEXT"]
    assert any("Grad-CAM region, not an outline" in c for c in comments)
    assert any("research use; validate locally" in c for c in comments)

    gsps = pydicom.dcmread(results["GSPS"])
    annotation = gsps.GraphicAnnotationSequence[0]
    assert "Grad-CAM region, not an outline" in annotation.TextObjectSequence[0].UnformattedTextValue
    for graphic in annotation.get("GraphicObjectSequence", []):
        assert graphic.TrackingID == "Grad-CAM region, not an outline"
    sc = pydicom.dcmread(results["SC"])
    assert "Grad-CAM region, not an outline" in sc.DerivationDescription


def test_a_wrong_file_is_refused_before_any_bundle_is_written(tmp_path, published):
    with pytest.raises(PretrainedError, match="is not the weights of densenet121-res224-all"):
        build_pretrained_bundle(DENSENET, published["resnet"], tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
