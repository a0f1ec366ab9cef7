"""`pleura models compose`: a published classifier (torchxrayvision, seeded weights standing in for
the published file) paired with the demo bundle's U-Net, imported as a new version and run by the
worker on a real radiograph; refusals when a network is missing or the decoding differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from config.settings import load_settings
from contract.active import active_bundle_dir, file_digests
from contract.bundle import MANIFEST_NAME, load_bundle
from contract.networks import import_torchxrayvision
from contract.preprocess import decode_radiograph
from dicom_samples import dciodvfy_errors, pydicom_data_file
from pleura.cli import app
from services import write_config
from training.compose import ComposeError, compose_bundle
from training.pretrained import PRETRAINED, build_pretrained_bundle, sha256_of
from training.registry import Registry
from worker.analysis import StudyAnalyser
from worker.inference.predict import network_outputs

xrv = import_torchxrayvision()
DENSENET = "densenet121-res224-all"


@pytest.fixture(scope="module")
def xrv_bundle(tmp_path_factory) -> Path:
    """A classifier-only torchxrayvision bundle around seeded weights saved as torchxrayvision publishes them."""
    folder = tmp_path_factory.mktemp("published")
    torch.manual_seed(22)
    torch.save(xrv.models.DenseNet(weights=None).eval(), folder / PRETRAINED[DENSENET].file_name)
    return build_pretrained_bundle(DENSENET, folder / PRETRAINED[DENSENET].file_name, folder / "bundle")


@pytest.fixture
def config(tmp_path) -> Path:
    return write_config(tmp_path / "pleura.toml", storage_dir=tmp_path / "storage", device="cpu")


def run(config: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, [*args, "--config", str(config)], env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return result.output


def test_compose_imports_a_bundle_with_each_networks_provenance_and_refuses_what_cannot_pair(
    config, tmp_path, xrv_bundle, demo_bundle
):
    settings = load_settings(config)
    registry = Registry(settings.storage_dir / "models")
    xrv_record, _ = registry.import_bundle(xrv_bundle)
    demo = load_bundle(demo_bundle).manifest

    out = run(config, "models", "compose", xrv_record.id, str(demo_bundle))
    assert f"imported xrv-{DENSENET}+{demo.name}/c" in out and "never validated together" in out
    [record] = [r for r in registry.read().versions.values() if r.id != xrv_record.id]
    assert active_bundle_dir(settings) == settings.storage_dir / "models" / "demo"  # imported, not promoted
    composed = load_bundle(registry.version_dir(record)).manifest
    classifier_source, segmenter_source = composed.components
    assert (classifier_source.role, classifier_source.name, classifier_source.version) == (
        "classifier", xrv_record.name, xrv_record.version)
    assert (segmenter_source.role, segmenter_source.name, segmenter_source.version) == (
        "segmenter", demo.name, demo.version)
    assert classifier_source.sha256 == xrv_record.files["classifier.pt"] == record.files["classifier.pt"]
    assert segmenter_source.sha256 == sha256_of(demo_bundle / demo.segmenter.weights_file) == record.files["segmenter.pt"]
    assert classifier_source.provenance["weights"] == DENSENET  # the published file it came from
    # Each network keeps its own input grid; the thresholds come from where each was tuned.
    assert composed.network_preprocessing(composed.classifier).input_size == 224
    assert composed.network_preprocessing(composed.classifier).crop == "centre_square"
    assert composed.network_preprocessing(composed.segmenter).input_size == demo.preprocessing.input_size
    assert composed.thresholds.probability == load_bundle(xrv_bundle).manifest.thresholds.probability
    assert composed.thresholds.min_area_px == demo.thresholds.min_area_px
    assert composed.synthetic_demo  # the demo U-Net was trained on synthetic images: the pair says so
    assert "already registered" in run(config, "models", "compose", xrv_record.id, str(demo_bundle))

    # A classifier-only bundle has no U-Net to give; a recipe that decodes otherwise cannot share decoding.
    missing = run(config, "models", "compose", str(demo_bundle), xrv_record.id, code=2)
    assert "has no segmenter to take" in missing and len(missing.strip().splitlines()) == 1
    other = tmp_path / "minmax"
    shutil.copytree(demo_bundle, other)
    manifest = json.loads((other / MANIFEST_NAME).read_text())
    manifest["preprocessing"]["voi"] = "minmax"
    (other / MANIFEST_NAME).write_text(json.dumps(manifest))
    refused = run(config, "models", "compose", xrv_record.id, str(other), code=2)
    assert "cannot share decoding: voi is 'dicom'" in refused and len(refused.strip().splitlines()) == 1
    unknown = run(config, "models", "compose", "nothing/0", str(demo_bundle), code=2)
    assert "no version 'nothing/0'" in unknown
    assert len(registry.read().versions) == 2


def test_a_wrong_source_refuses_before_writing(tmp_path, xrv_bundle):
    with pytest.raises(ComposeError, match="has no segmenter"):
        compose_bundle(load_bundle(xrv_bundle), load_bundle(xrv_bundle), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _store(storage: Path, source: Path) -> dict[str, str]:
    ds = pydicom.dcmread(source)
    key = f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    (storage / key).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, storage / key)
    return {"sop_instance_uid": str(ds.SOPInstanceUID), "key": key}


def _texts(dataset: pydicom.Dataset, concept: str) -> list[str]:
    found = []
    for item in dataset.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if name == concept and "TextValue" in item:
            found.append(str(item.TextValue))
        found.extend(_texts(item, concept))
    return found


def test_the_worker_runs_the_composed_bundle_on_a_real_radiograph_and_names_both_networks(
    tmp_path, xrv_bundle, demo_bundle
):
    bundle_dir = compose_bundle(load_bundle(xrv_bundle), load_bundle(demo_bundle), tmp_path / "composed")
    source = pydicom_data_file("RG1_UNCR.dcm")
    dataset = pydicom.dcmread(source)
    analyser = StudyAnalyser.from_bundle_dir(tmp_path / "storage", bundle_dir, device="cpu")
    image = decode_radiograph(dataset, analyser.bundle.manifest.preprocessing)
    probabilities, maps = network_outputs(analyser.models, [image])
    assert maps.shape == (1, 128, 128)  # the U-Net's own grid beside the classifier's 224 px
    # Thresholds that flag this image with the U-Net's most confident pixels: the path that writes a SEG.
    manifest = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    manifest["thresholds"].update(probability=float(probabilities[0]) * 0.5,
                                  mask=float(np.quantile(maps[0], 0.99)), min_area_px=1)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    analyser = StudyAnalyser.from_bundle_dir(tmp_path / "storage", bundle_dir, device="cpu")

    summary = analyser.analyse(str(dataset.StudyInstanceUID), [_store(analyser.storage_dir, source)])
    [entry] = summary["images"]
    assert entry["status"] == "analysed" and entry["flagged"] is True and entry["area_px"] > 0
    results = {r["kind"]: analyser.storage_dir / r["key"] for r in summary["results"]}
    assert sorted(results) == ["GSPS", "SC", "SEG", "SR"]
    for path in results.values():
        assert dciodvfy_errors(path) == [], path.name

    xrv_manifest, demo = load_bundle(xrv_bundle).manifest, load_bundle(demo_bundle).manifest
    named = [f"classifier {xrv_manifest.name} {xrv_manifest.version}", f"segmenter {demo.name} {demo.version}"]
    sr = pydicom.dcmread(results["SR"])
    parameters = _texts(sr, "Algorithm Parameters")
    assert all(parameters.count(text) >= 1 for text in named), parameters
    assert any(all(text in comment for text in named) for comment in _texts(sr, "Comment")), "no comment names both"
    seg = pydicom.dcmread(results["SEG"])
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert all(text.split(" ", 1)[1] in str(algorithm.AlgorithmParameters) for text in named)
    assert file_digests(bundle_dir)["segmenter.pt"] == sha256_of(demo_bundle / demo.segmenter.weights_file)
