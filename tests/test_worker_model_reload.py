"""Workers follow the registry: a promoted model is used from the next study on, without a restart.

In process: the worker's :class:`ActiveModel` swaps analysers, a study in flight keeps its own, a
bundle that fails to load leaves the current model in place and is reported. With real processes:
`pleura node` and `pleura worker` (embedded broker), DCMTK's storescu as the modality, and
`pleura models promote` / `rollback` run while the worker runs; each study's SR names the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pydicom

from config.settings import load_settings
from node.ops.health import check_worker_model
from node.ops.server import worker_ops_server
from services import REPO, find_tool, free_port, http_get, pleura_process, port_open, wait_for, write_config
from model_versions import make_version
from node.ledger import Ledger
from training.registry import Registry
from training.synthetic import synthetic_dicom
from worker.active_model import ActiveModel
from contract.celery_app import make_celery

RESULT_TIMEOUT = 600  # generous: the suite must pass on a loaded 2-core machine


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
    assert active.current() is first  # 2.0 is loaded and warmed beside it
    active.wait_for_switch()
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
    active.wait_for_switch()
    [status] = registry.workers()
    assert status["state"] == "ready" and status["warming"] is None
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


class HeldWarmUp:
    """An analyser loader whose warm-up of chosen versions waits until the test lets it go, so the
    test can look at the worker while a model is warming."""

    def __init__(self, hold: set[str]) -> None:
        self.hold, self.released, self.warming = hold, threading.Event(), threading.Event()

    def __call__(self, settings, bundle_dir: Path):
        from worker.analysis import StudyAnalyser

        analyser = StudyAnalyser.for_settings(settings, bundle_dir)
        if analyser.bundle.identity.version in self.hold:
            warm = analyser.warm

            def held_warm() -> None:
                self.warming.set()
                assert self.released.wait(120), "the test never released the warm-up"
                warm()

            analyser.warm = held_warm
        return analyser


def _report(registry: Registry) -> dict:
    [report] = registry.workers()
    assert report["pid"] == os.getpid() and report["kind"] == "radiograph"
    return report


def test_a_worker_is_ready_only_once_its_model_is_warm(tmp_path, tiny_base_bundle):
    storage = tmp_path / "storage"
    registry = _registry_with_two_versions(tmp_path, tiny_base_bundle, storage)
    settings = load_settings(storage_dir=storage, device="cpu", inference_backend="auto")
    loader = HeldWarmUp({"1.0"})
    active = ActiveModel(settings, loader=loader)
    ops = worker_ops_server(settings, make_celery(settings), free_port())
    ops.start()
    try:
        readyz = f"http://127.0.0.1:{ops.port}/readyz"
        status, body = http_get(readyz)
        assert status == 503 and "no model loaded yet" in json.loads(body)["checks"]["model"]["detail"]

        start_up = threading.Thread(target=active.warm)
        start_up.start()
        assert loader.warming.wait(120)
        report = _report(registry)
        assert report["state"] == "warming" and report["loaded"] is None and report["warming"].startswith("tiny 1.0")
        status, body = http_get(readyz)
        checks = json.loads(body)["checks"]
        assert status == 503 and not checks["model"]["ok"] and "warming" in checks["model"]["detail"]
        assert checks["broker"]["ok"] and checks["storage"]["ok"]

        loader.released.set()
        start_up.join(120)
        assert active.analyser.bundle.identity.version == "1.0"
        report = _report(registry)
        assert report["state"] == "ready" and report["loaded"].startswith("tiny 1.0") and report["warming"] is None
        # The export and the backend choice were made during the warm-up, not by the first study.
        assert active.analyser.backends[0] in ("torch", "onnxruntime")
        assert list((settings.onnx_cache).glob("*/*.onnx"))
        status, body = http_get(readyz)
        assert status == 200 and json.loads(body)["checks"]["model"]["detail"].startswith("radiograph: tiny 1.0")
    finally:
        loader.released.set()
        ops.stop()


def test_a_study_during_a_model_switch_is_analysed_by_the_old_model_until_the_new_one_is_warm(
    tmp_path, tiny_base_bundle
):
    storage = tmp_path / "storage"
    registry = _registry_with_two_versions(tmp_path, tiny_base_bundle, storage)
    settings = load_settings(storage_dir=storage, device="cpu", inference_backend="torch")
    loader = HeldWarmUp({"2.0"})
    active = ActiveModel(settings, loader=loader)
    first = active.warm()
    dataset, _ = synthetic_dicom(seed=7, positive=True, size=128)
    key = "instances/study/series/image.dcm"
    (storage / key).parent.mkdir(parents=True)
    dataset.save_as(storage / key, enforce_file_format=True)
    item = {"sop_instance_uid": dataset.SOPInstanceUID, "key": key}
    try:
        registry.promote("tiny/2.0")
        assert active.current() is first
        assert loader.warming.wait(120)  # 2.0 is loaded and warming beside 1.0
        # A study that arrives now is analysed by 1.0, at once; the worker stays ready.
        assert active.current().analyse(dataset.StudyInstanceUID, [item])["model"]["version"] == "1.0"
        report = _report(registry)
        assert report["state"] == "ready" and report["loaded"].startswith("tiny 1.0")
        assert report["warming"].startswith("tiny 2.0")
        ready = check_worker_model(settings)  # the worker's /readyz: ready, on 1.0
        assert ready.startswith("radiograph: tiny 1.0") and "warming tiny 2.0" in ready

        loader.released.set()
        active.wait_for_switch(120)
        report = _report(registry)
        assert report["state"] == "ready" and report["loaded"].startswith("tiny 2.0") and report["warming"] is None
        assert active.current().analyse(dataset.StudyInstanceUID, [item])["model"]["version"] == "2.0"

        # Promoted and rolled back while it warms: the warmed model is dropped, 2.0 stays.
        registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "bundle-3.0", "3.0"))
        loader.hold, loader.released, loader.warming = {"3.0"}, threading.Event(), threading.Event()
        second = active.current()
        registry.promote("tiny/3.0")
        assert active.current() is second
        assert loader.warming.wait(120)
        registry.rollback()
        loader.released.set()
        active.wait_for_switch(120)
        assert active.current() is second
        assert _report(registry)["loaded"].startswith("tiny 2.0") and _report(registry)["warming"] is None
    finally:
        loader.released.set()


class Pleura:
    """`pleura node` and `pleura worker` on the embedded broker, no destinations, registry in the storage."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port, self.worker_metrics_port = free_port(), free_port()
        self.storage = folder / "storage"
        self.config = write_config(
            folder / "pleura.toml", ae_title="PLEURA", host="127.0.0.1", port=self.port, storage_dir=self.storage,
            device="cpu", settle_seconds=1.0, worker_metrics_port=self.worker_metrics_port, metrics_port=free_port(),
            model_poll_seconds=1.0,
        )
        self.node = pleura_process("node", self.config, folder / "node.log")
        self.worker = pleura_process("worker", self.config, folder / "worker.log")
        wait_for(lambda: port_open(self.port) or not self.node.alive(), 60, "pleura node to listen")
        assert self.node.alive(), self.node.output()

    def worker_report(self) -> dict:
        """The worker's last status report (worker/active_model.py), {} before its first."""
        reports = [r for r in Registry(self.storage / "models").workers() if r.get("pid") == self.worker.proc.pid]
        return reports[0] if reports else {}

    def wait_until_warm(self, version: str) -> None:
        """Until the worker reports ``version`` loaded and warm, and its /readyz agrees."""

        def warm() -> bool:
            assert self.worker.alive(), self.logs()
            report = self.worker_report()
            return report.get("state") == "ready" and str(report.get("loaded")).startswith(f"tiny {version} ")

        try:
            wait_for(warm, RESULT_TIMEOUT, f"the worker to warm {version}", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.worker_report()}\n{self.logs()}") from None
        status, body = http_get(f"http://127.0.0.1:{self.worker_metrics_port}/readyz")
        assert status == 200 and f"tiny {version} " in json.loads(body)["checks"]["model"]["detail"], body

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


def test_a_running_worker_switches_to_a_promoted_model_once_it_is_warm(tmp_path, tiny_base_bundle):
    _registry_with_two_versions(tmp_path, tiny_base_bundle, tmp_path / "storage")
    pleura = Pleura(tmp_path)
    try:
        pleura.wait_until_warm("1.0")  # warmed at start-up, before the first task
        assert pleura.analyse(seed=101) == "1.0"
        assert "active radiograph model: tiny/2.0" in pleura.models("promote", "tiny/2.0")
        # A study sent right after the promotion: the old model, or the new one once it is warm;
        # never a failure or a wait for the new one's export.
        assert pleura.analyse(seed=102) in ("1.0", "2.0")
        pleura.wait_until_warm("2.0")
        assert pleura.analyse(seed=103) == "2.0"
        assert "active radiograph model: tiny/1.0" in pleura.models("rollback")
        assert pleura.analyse(seed=104) in ("1.0", "2.0")
        pleura.wait_until_warm("1.0")
        assert pleura.analyse(seed=105) == "1.0"
        assert pleura.worker.alive(), pleura.logs()
        assert pleura.worker_report()["error"] is None and pleura.worker_report()["warming"] is None
        listed = pleura.models("list")
        assert "tiny 1.0" in listed and "ready" in listed  # the worker's report: what it has loaded
    finally:
        pleura.stop()
