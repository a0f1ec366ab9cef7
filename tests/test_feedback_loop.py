"""Closing the loop with real processes: `pleura node` (SCP, worklist API) and `pleura worker`
analyse studies sent with storescu; a radiologist confirms, rejects and corrects on the worklist
API, and a PACS viewer sends a Segmentation back with storescu; the feedback is exported as a
SIIM-ACR set, a U-Net is retrained on it plus a synthetic set (a few steps), the new version is
imported and promoted in the registry, and the worker analyses the next study with it: the SR
names it."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from contract.active import RegistryLayout
from node.ledger import Ledger
from pleura.cli import app
from seg_fixtures import radiologist_seg, save
from services import find_tool, free_port, pleura_process, port_open, wait_for, write_config
from test_training_train import TINY_UNET
from training.datasets import read_siim
from training.synthetic import synthetic_dicom

TOKEN = "loop-radiologist-token-0123456789"
API_USERS = [{"name": "dr.loop", "role": "feedback", "token": TOKEN}]
NEW_NAME, NEW_VERSION = "pleura-feedback", "0.2.0-feedback"
ANALYSIS_TIMEOUT = 300  # five 512 px studies through the demo model on 2 shared CPU cores


def _send(port: int, files: list[Path], calling_ae: str) -> None:
    sent = subprocess.run(
        [find_tool("storescu"), "-R", "-aet", calling_ae, "-aec", "PLEURA", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stderr


def _sr_texts(item: pydicom.Dataset) -> set[tuple[str, str]]:
    """Every TEXT content item of an SR, as (concept code, text), at any depth."""
    found = set()
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            found.add((child.ConceptNameCodeSequence[0].CodeValue, str(child.TextValue)))
        found |= _sr_texts(child)
    return found


def _png(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_feedback_retrains_a_model_that_analyses_the_next_study(
    tmp_path: Path, demo_bundle: Path, synthetic_siim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PLEURA_DATABASE_URL", "PLEURA_CONFIG", "PLEURA_MODEL_DIR", "PLEURA_MODEL_REGISTRY_DIR",
                 "PLEURA_MODEL_BUNDLE_DIR", "PLEURA_STORAGE_DIR"):
        monkeypatch.delenv(name, raising=False)
    storage = tmp_path / "storage"
    # The registry in the storage directory, with the demo bundle active while nothing is promoted.
    shutil.copytree(demo_bundle, storage / "models" / "demo")
    port, api_port = free_port(), free_port()
    config = write_config(
        tmp_path / "pleura.toml", ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=storage,
        device="cpu", settle_seconds=1.0, api_host="127.0.0.1", api_port=api_port,
    )
    env = {"PLEURA_API_USERS": json.dumps(API_USERS)}
    node = pleura_process("node", config, tmp_path / "node.log", env)
    worker = pleura_process("worker", config, tmp_path / "worker.log")

    def logs() -> str:
        return f"--- node ---\n{node.output()[-5000:]}\n--- worker ---\n{worker.output()[-5000:]}"

    def analysed(ds: pydicom.Dataset) -> dict:
        ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
        try:
            return wait_for(
                lambda: (s := ledger.study_status(ds.StudyInstanceUID)) and s["analysed_at"] and s,
                ANALYSIS_TIMEOUT, "the analysis",
            )
        finally:
            ledger.close()

    try:
        wait_for(lambda: (port_open(port) and port_open(api_port)) or not node.alive(), 60, "pleura node to listen")
        assert node.alive(), logs()
        # Four studies: one to confirm, one to reject, one the radiologist outlines on the worklist,
        # one outlined in a PACS viewer and sent back as a SEG.
        cases = {name: synthetic_dicom(seed=seed, positive=positive, size=512)
                 for name, seed, positive in (("confirm", 4242, True), ("reject", 4243, False),
                                              ("correct", 4244, True), ("seg", 4245, True))}
        _send(port, [save(ds, tmp_path / f"{name}.dcm") for name, (ds, _) in cases.items()], "MODALITY")
        for name, (ds, _) in cases.items():
            status = analysed(ds)
            assert status["model_version"] != NEW_VERSION, logs()
        old_version = status["model_version"]

        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers={"Authorization": f"Bearer {TOKEN}"})
        refs = {study["study_instance_uid"]: study for study in api.get("/api/studies").json()}
        confirm, reject, correct, seg = (cases[name][0] for name in ("confirm", "reject", "correct", "seg"))
        assert refs[confirm.StudyInstanceUID]["model_flagged"] is True, refs[confirm.StudyInstanceUID]
        for ds, verdict in ((confirm, "confirmed"), (reject, "rejected")):
            answer = api.post(f"/api/studies/{refs[ds.StudyInstanceUID]['ref']}/feedback", json={"verdict": verdict})
            assert answer.status_code == 201, answer.text
        answer = api.post(f"/api/studies/{refs[correct.StudyInstanceUID]['ref']}/images/0/correction",
                          json={"mask_png": _png(cases["correct"][1])})
        assert answer.status_code == 201, answer.text
        outline = radiologist_seg([seg], [cases["seg"][1]])
        _send(port, [save(outline, tmp_path / "outline-seg.dcm")], "READING1")

        # The feedback as a SIIM-ACR set: every verdict, the drawing and the SEG sent back.
        _cli("dataset", "export-feedback", "--out", str(tmp_path / "feedback"), "--config", str(config))
        exported = {example.image_id: example for example in read_siim(tmp_path / "feedback").examples}
        assert set(exported) == {ds.SOPInstanceUID for ds, _ in cases.values()}
        assert exported[confirm.SOPInstanceUID].positive and not exported[reject.SOPInstanceUID].positive
        for name in ("correct", "seg"):
            np.testing.assert_array_equal(exported[cases[name][0].SOPInstanceUID].mask(), cases[name][1])
        assert node.alive() and worker.alive(), logs()

        # Retrain the U-Net a few steps on the feedback plus a synthetic set, beside the classifier of
        # the model in service (the demo's).
        run = tmp_path / "run"
        _cli("train", "--preset", "seg-unet-resnet18", "--from-feedback", "--data", str(synthetic_siim),
             "--out", str(run), "--epochs", "1", "--steps-per-epoch", "1",
             "--batch-size", "2", "--input-size", "64", "--set", json.dumps(TINY_UNET).join(["extra=", ""]),
             "--name", NEW_NAME, "--version", NEW_VERSION, "--cache-dir", str(tmp_path / "cache"),
             "--device", "cpu", "--config", str(config))
        assert (run / "bundle" / "manifest.json").is_file()

        promote(config, run / "bundle")
        # The worker warms the promoted version beside the demo's and serves with the old one until
        # then (a study never waits for a warm-up): send the next study once its report says so.
        promoted = f"{NEW_NAME} {NEW_VERSION}"
        wait_for(
            lambda: any(report.get("state") == "ready" and str(report.get("loaded")).startswith(promoted)
                        for report in RegistryLayout(storage / "models").workers()),
            600, "the worker to warm the promoted version", interval=0.5,
        )

        # The next study is analysed with the promoted version, and its SR says so.
        following, _ = synthetic_dicom(seed=4246, positive=True, size=512)
        _send(port, [save(following, tmp_path / "following.dcm")], "MODALITY")
        status = analysed(following)
        assert (status["model_name"], status["model_version"]) == (NEW_NAME, NEW_VERSION), logs()
        ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
        try:
            [sr] = [r for r in ledger.list_results(following.StudyInstanceUID) if r.kind == "SR"]
            [earlier] = [r for r in ledger.list_results(confirm.StudyInstanceUID) if r.kind == "SR"]
        finally:
            ledger.close()
        report = pydicom.dcmread(storage / sr.storage_key)
        texts = _sr_texts(report)
        assert ("111001", NEW_NAME) in texts and ("111003", NEW_VERSION) in texts  # Algorithm Name, Version
        assert ("111003", old_version) in _sr_texts(pydicom.dcmread(storage / earlier.storage_key))
    finally:
        worker.stop()
        node.stop()


def promote(config: Path, bundle: Path) -> None:
    """Put the retrained bundle into service through the model registry."""
    _cli("models", "import", str(bundle), "--config", str(config))
    _cli("models", "promote", f"{NEW_NAME}/{NEW_VERSION}", "--config", str(config))
