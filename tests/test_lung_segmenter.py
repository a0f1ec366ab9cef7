"""Lung fields from torchxrayvision's ChestX-Det PSPNet when PLEURA_LUNG_SEGMENTER_WEIGHTS names its
weights; the threshold estimate otherwise; a wrong file stops the worker at start, in one line.

The published weights stand in as the same network with seeded weights, saved as torchxrayvision
publishes them (a DataParallel state dict, keys ``module.…``). Its last layer is set so that every
pixel is lung: the segmenter's fields are then the whole image, and the share of the hemithorax is
predictable (the mask's area over the affected half's).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from config.settings import load_settings
from pleura.cli import app
from services import write_config
from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser
from worker.inference.lungs import LUNG_OUTPUTS, LUNG_SEGMENTER_METHOD, THRESHOLD_METHOD, _pspnet
from worker.startup import WorkerStartError, check_lung_segmenter


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(22)
    network = _pspnet()
    with torch.no_grad():
        network.classification.weight.zero_()
        network.classification.bias.fill_(-10.0)
        network.classification.bias[list(LUNG_OUTPUTS)] = 10.0  # both lungs everywhere
    path = tmp_path_factory.mktemp("pspnet") / "pspnet_chestxray_best_model_4.pth"
    torch.save({f"module.{key}": value for key, value in network.state_dict().items()}, path)
    return path


def _analyse(analyser: StudyAnalyser, dataset: pydicom.Dataset) -> tuple[dict, dict[str, Path]]:
    key = f"instances/{dataset.StudyInstanceUID}/{dataset.SeriesInstanceUID}/{dataset.SOPInstanceUID}.dcm"
    (analyser.storage_dir / key).parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(analyser.storage_dir / key, enforce_file_format=True)
    summary = analyser.analyse(str(dataset.StudyInstanceUID), [{"sop_instance_uid": str(dataset.SOPInstanceUID), "key": key}])
    [entry] = summary["images"]
    return entry, {r["kind"]: analyser.storage_dir / r["key"] for r in summary["results"]}


def _comments(sr_path: Path) -> list[str]:
    sr = hd.sr.srread(sr_path)
    return [i.TextValue for i in sr.content[0].ContentSequence if i.ValueType == "TEXT"]


def test_the_share_of_the_hemithorax_is_measured_on_the_segmenters_lungs_when_configured(tmp_path, weights, demo_bundle):
    positive, _ = synthetic_dicom(seed=77, positive=True, size=512)
    plain = StudyAnalyser.for_settings(
        load_settings(write_config(tmp_path / "plain.toml", storage_dir=tmp_path / "plain", device="cpu")), demo_bundle)
    assert plain.lung_segmenter is None
    estimated, estimated_results = _analyse(plain, positive)
    assert estimated["flagged"] is True and 0 < estimated["hemithorax_fraction"] < 1
    assert any(f"share of the hemithorax measured on {THRESHOLD_METHOD}" in c for c in _comments(estimated_results["SR"]))

    settings = load_settings(write_config(tmp_path / "lungs.toml", storage_dir=tmp_path / "lungs", device="cpu",
                                          lung_segmenter_weights=weights))
    check_lung_segmenter(settings)  # the worker's start-up check accepts the file
    analyser = StudyAnalyser.for_settings(settings, demo_bundle)
    segmented, results = _analyse(analyser, positive)
    assert segmented["flagged"] is True
    # Whole-image lungs: the affected hemithorax is the affected half of the image.
    mask = pydicom.dcmread(results["SEG"]).pixel_array.astype(bool)
    half = mask.shape[1] // 2
    affected = mask[:, half:] if mask[:, half:].sum() >= mask[:, :half].sum() else mask[:, :half]
    expected = affected.sum() / affected.size
    assert segmented["hemithorax_fraction"] == pytest.approx(expected, abs=1e-4)
    assert abs(segmented["hemithorax_fraction"] - estimated["hemithorax_fraction"]) > 0.01
    comments = _comments(results["SR"])
    assert any(f"share of the hemithorax measured on {LUNG_SEGMENTER_METHOD}" in c for c in comments)
    assert not any(THRESHOLD_METHOD in c for c in comments)


def test_a_wrong_weights_file_stops_the_worker_at_start_in_one_line(tmp_path, demo_bundle):
    wrong = tmp_path / "pspnet.pth"
    shutil.copy(demo_bundle / "segmenter.pt", wrong)  # a state dict, of another network
    settings = load_settings(write_config(tmp_path / "pleura.toml", storage_dir=tmp_path / "storage", device="cpu",
                                          model_bundle_dir=demo_bundle, lung_segmenter_weights=wrong))
    with pytest.raises(WorkerStartError, match="not the weights of torchxrayvision's ChestX-Det PSPNet: .* tensors missing"):
        check_lung_segmenter(settings)

    result = CliRunner().invoke(app, ["worker", "--config", str(tmp_path / "pleura.toml")], env={"COLUMNS": "250"})
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if "Model bundle error" in line]
    assert "(lung segmenter)" in line and "tensors missing" in line and "Traceback" not in result.output

    missing = tmp_path / "absent.pth"
    settings = load_settings(write_config(tmp_path / "absent.toml", storage_dir=tmp_path / "storage", device="cpu",
                                          lung_segmenter_weights=missing))
    with pytest.raises(WorkerStartError, match="absent.pth: no such file"):
        check_lung_segmenter(settings)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"\x80\x02not a torch file")
    settings = load_settings(write_config(tmp_path / "truncated.toml", storage_dir=tmp_path / "storage", device="cpu",
                                          lung_segmenter_weights=truncated))
    with pytest.raises(WorkerStartError, match="not a readable torch weights file"):
        check_lung_segmenter(settings)
