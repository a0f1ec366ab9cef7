"""The `pleura` command's conventions: --version, results on stdout (JSON with --json) and
messages on stderr, fixed choices that --help lists and completion offers, the licence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from contract.bundle import load_bundle
from pleura.cli import app
from pleura.cli_common import _complete_device, complete_preset
from services import REPO

runner = CliRunner()


def pleura(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    return subprocess.run([sys.executable, "-m", "pleura.cli", *args], env={**clean, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_version_names_the_package_and_the_active_models(tmp_path: Path, demo_bundle: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    env = {"PLEURA_STORAGE_DIR": str(tmp_path / "storage"), "PLEURA_MODEL_BUNDLE_DIR": str(demo_bundle)}
    for flag in ("--version", "-V"):
        shown = pleura(flag, env=env)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == f"pleura {version}"
        assert lines[1] == f"radiograph model: {load_bundle(demo_bundle).identity.label}"
        assert lines[2].startswith("ct model: ")


def test_dataset_check_prints_its_report_on_stdout_or_as_json(synthetic_siim: Path) -> None:
    checked = runner.invoke(app, ["dataset", "check", "--data", str(synthetic_siim)])
    assert checked.exit_code == 0, checked.output
    assert "24 images" in checked.stdout and checked.stderr == ""
    as_json = runner.invoke(app, ["dataset", "check", "--data", str(synthetic_siim), "--json"])
    summary = json.loads(as_json.stdout)
    assert summary["kind"] == "siim" and summary["images"] == 24 and summary["positives"] == 12
    assert summary["skipped"] == [] and summary["label_file"].endswith("train-rle.csv")


def test_models_list_as_json(tmp_path: Path, demo_bundle: Path) -> None:
    single = json.loads(pleura("models", "list", "--json", env={"PLEURA_STORAGE_DIR": str(tmp_path / "s"),
                                                                  "PLEURA_MODEL_BUNDLE_DIR": str(demo_bundle)}).stdout)
    assert single["single_bundle"]["usable"] is True
    assert single["single_bundle"]["version"] == load_bundle(demo_bundle).manifest.version
    registry = pleura("models", "list", "--json", env={"PLEURA_STORAGE_DIR": str(tmp_path / "s")})
    listed = json.loads(registry.stdout)
    assert listed["versions"] == [] and set(listed["active"]) == {"radiograph", "ct"}
    assert listed["active"]["radiograph"]["version_id"] is None  # nothing promoted: the demo bundle


def test_fixed_choices_are_listed_checked_and_completed() -> None:
    def usage(*command: str) -> str:
        return runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output

    assert "siim|cxr14|archive" in usage("dataset", "check")
    assert "leaderboard|sensitivity" in usage("tune")
    assert "json|csv" in usage("feedback-export")
    assert "radiograph|ct" in usage("models", "promote")
    assert "seg|nifti" in usage("dataset", "synthetic-ct")
    wrong = runner.invoke(app, ["dataset", "check", "--data", ".", "--format", "dicom"])
    assert wrong.exit_code == 2 and "'dicom' is not one of" in wrong.output
    device = runner.invoke(app, ["evaluate", "--data", ".", "--out", "x", "--device", "gpu"])
    assert device.exit_code == 2 and "'gpu' is not one of auto, cpu, cuda, cuda:N" in device.output
    assert _complete_device("cu")[:2] == ["cuda", "cuda:0"]
    assert complete_preset("cls-dense") == ["cls-densenet121", "cls-densenet121-svm"]
    assert "seg-unet-resnet34-dicefocal" in complete_preset("seg-")


def test_the_licence_is_the_one_pyproject_names() -> None:
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    changelog = (REPO / "CHANGELOG.md").read_text()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"## {version}" in changelog


def test_train_prints_its_result_as_json_on_stdout_and_its_progress_on_stderr(
    synthetic_siim: Path, tiny_base_bundle: Path, tmp_path: Path
) -> None:
    """`pleura train --json`: stdout is one JSON document a script reads (the bundle, its name,
    version, label and metrics); the epochs and the progress go to stderr."""
    out = tmp_path / "run"
    trained = pleura(
        "train", "--preset", "cls-cbr-baseline", "--data", str(synthetic_siim), "--base", str(tiny_base_bundle),
        "--out", str(out), "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "2", "--input-size", "64",
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--json",
        env={"PLEURA_STORAGE_DIR": str(tmp_path / "storage"), "COLUMNS": "200"},
    )
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)  # the whole of stdout, nothing else in it
    bundle = load_bundle(out / "bundle")
    assert result["bundle"] == str(bundle.path)
    assert (result["name"], result["version"]) == (bundle.manifest.name, bundle.manifest.version)
    assert result["label"] == bundle.identity.label and result["metrics"] == bundle.manifest.metrics
    assert "classifier_val_loss" in result["metrics"]
    assert "epoch 1/1" in trained.stderr and str(bundle.path) in trained.stderr
