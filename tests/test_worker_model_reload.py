"""Workers follow the registry: a promoted model is used from the next study on, without a restart.

In process: the worker's :class:`ActiveModel` swaps analysers, a study in flight keeps its own, a
bundle that fails to load leaves the current model in place and is reported. With real processes:
`pleura node` and `pleura worker` (embedded broker), DCMTK's storescu as the modality, and
`pleura models promote` / `rollback` run while the worker runs; each study's SR names the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom

from config.settings import load_settings
from services import REPO, find_tool, free_port, pleura_process, port_open, wait_for, write_config
from model_versions import make_version
from node.ledger import Ledger
from training.registry import Registry
from training.synthetic import synthetic_dicom
from worker.active_model import ActiveModel

RESULT_TIMEOUT = 300


def _sr_algorithm_version(sr: pydicom.Dataset) -> str:
    """The Algorithm Version (DCM 111003) of the SR's content tree: the model that made it."""
    found = []

    def walk(items) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if code == "111003":
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert found, "the SR names no algorithm version"
    assert len(set(found)) == 1, found
    return found[0]


def _registry_with_two_versions(tmp_path: Path, tiny_base_bundle: Path, storage: Path) -> Registry:
    registry = Registry(storage / "models")
    for version in ("1.0", "2.0"):
        registry.import_bundle(make_version(tiny_base_bundle, tmp_path / f"bundle-{version}", version))
    registry.promote("tiny/1.0")
    return registry


def test_the_worker_model_follows_promotions_and_keeps_its_own_on_a_bad_one(tmp_path, tiny_base_bundle):
    storage = tmp_path / "storage"
    registry = _registry_with_two_versions(tmp_path, tiny_base_bundle, storage)
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "bundle-3.0", "3.0"))
    active = ActiveModel(load_settings(storage_dir=storage, device="cpu"))

    first = active.current()
    assert first.bundle.identity.version == "1.0"
    assert active.current() is first  # nothing changed: nothing loaded
    dataset, _ = synthetic_dicom(seed=5, positive=True, size=128)
    key = "instances/study/series/image.dcm"
    (storage / key).parent.mkdir(parents=True)
    dataset.save_as(storage / key, enforce_file_format=True)
    item = {"sop_instance_uid": dataset.SOPInstanceUID, "key": key}

    registry.promote("tiny/2.0")
    second = active.current()
    assert second is not first and second.bundle.identity.version == "2.0"
    # A task that started before the promotion holds `first`, and finishes with it.
    assert first.analyse(dataset.StudyInstanceUID, [item])["model"]["version"] == "1.0"
    assert second.analyse(dataset.StudyInstanceUID, [item])["model"]["version"] == "2.0"

    # Version 3.0 is promoted, then its weights are damaged on the shared disk: the worker keeps
    # 2.0, says why where `pleura models list` shows it, and does not try 3.0 again for every task.
    registry.promote("tiny/3.0")
    weights = registry.root / "versions" / "tiny" / "3.0" / "classifier.pt"
    weights.chmod(0o644)
    weights.write_bytes(b"not a state dict")
    assert active.current() is second
    [status] = registry.workers()
    assert status["loaded"].startswith("tiny 2.0") and "checksum mismatch" in status["error"]
    assert str(weights) in status["error"]
    assert active.current() is second and registry.workers()[0]["error"] == status["error"]

    registry.rollback()  # back to 2.0: the loaded one, and the failure is over
    assert active.current() is second
    assert registry.workers()[0]["error"] is None

    # A damaged state file leaves the model in place as well.
    registry.state_file.write_text("{ not json")
    assert active.current() is second
    assert "registry.json is damaged" in registry.workers()[0]["error"]


class Pleura:
    """`pleura node` and `pleura worker` on the embedded broker, no destinations, registry in the storage."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.storage = folder / "storage"
        self.config = write_config(
            folder / "pleura.toml", ae_title="PLEURA", host="127.0.0.1", port=self.port, storage_dir=self.storage,
            device="cpu", settle_seconds=1.0,
        )
        self.node = pleura_process("node", self.config, folder / "node.log")
        self.worker = pleura_process("worker", self.config, folder / "worker.log")
        wait_for(lambda: port_open(self.port) or not self.node.alive(), 60, "pleura node to listen")
        assert self.node.alive(), self.node.output()

    def logs(self) -> str:
        return f"--- node ---\n{self.node.output()[-6000:]}\n--- worker ---\n{self.worker.output()[-6000:]}"

    def models(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pleura.cli", "models", *args, "--config", str(self.config)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}, "COLUMNS": "250"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def analyse(self, seed: int) -> str:
        """Send one synthetic study with storescu; the algorithm version its SR names."""
        dataset, _ = synthetic_dicom(seed=seed, positive=True, size=256)
        path = self.folder / f"study-{seed}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        sent = subprocess.run(
            [find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(self.port), str(path)],
            capture_output=True, text=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        ledger = Ledger(f"sqlite:///{self.storage / 'ledger.sqlite'}")
        uid = dataset.StudyInstanceUID

        def analysed() -> bool:
            assert self.worker.alive() and self.node.alive(), self.logs()
            status = (ledger.study_status(uid) or {}).get("status")
            assert status not in ("failed", "not_analysed"), (status, self.logs())
            return status in ("done", "delivered")

        try:
            wait_for(analysed, RESULT_TIMEOUT, f"study {seed} analysed", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        [sr] = [r for r in ledger.list_results(uid) if r.kind == "SR"]
        return _sr_algorithm_version(pydicom.dcmread(self.storage / sr.storage_key))

    def stop(self) -> None:
        self.worker.stop()
        self.node.stop()


def test_a_running_worker_uses_the_promoted_model_from_the_next_study(tmp_path, tiny_base_bundle):
    _registry_with_two_versions(tmp_path, tiny_base_bundle, tmp_path / "storage")
    pleura = Pleura(tmp_path)
    try:
        assert pleura.analyse(seed=101) == "1.0"
        assert "active radiograph model: tiny/2.0" in pleura.models("promote", "tiny/2.0")
        assert pleura.analyse(seed=102) == "2.0"
        assert "active radiograph model: tiny/1.0" in pleura.models("rollback")
        assert pleura.analyse(seed=103) == "1.0"
        assert pleura.worker.alive(), pleura.logs()
        log = pleura.worker.output()
        assert "model changed: tiny 1.0" in log and "model changed: tiny 2.0" in log
        assert "raised unexpected" not in log and "Retry in" not in log, log[-4000:]  # no task failed
        listed = pleura.models("list")
        assert "tiny 1.0" in listed  # the worker's report: what it has loaded
    finally:
        pleura.stop()
