"""The whole path with real peers: storescu -> `pleura node` -> Celery -> `pleura worker` -> Orthanc.

Real Redis (and the embedded broker), a real Celery worker process running the demo model, DCMTK
as the modality, Orthanc as the PACS and dciodvfy as the judge of every object Pleura wrote.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from node.ledger import Ledger
from services import Orthanc, RedisServer, find_tool, free_port, pleura_process, port_open, wait_for, write_config
from dicom_samples import dciodvfy_errors, pydicom_data_file
from training.synthetic import synthetic_dicom

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RESULT_TIMEOUT = 420  # CPU inference of a 2.5k x 3k radiograph on 2 cores, plus process start-up


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def synthetic_positive(tmp_path) -> tuple[Path, pydicom.Dataset]:
    dataset, _ = synthetic_dicom(seed=4242, positive=True, size=512)
    path = tmp_path / "synthetic_positive.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, dataset


class Pleura:
    """A running `pleura node` and `pleura worker` pair on one configuration."""

    def __init__(self, folder: Path, bundle: Path, orthanc: Orthanc, broker_url: str | None):
        self.port = free_port()
        self.storage = folder / "storage"
        values = dict(
            ae_title="PLEURA",
            host="127.0.0.1",
            port=self.port,
            storage_dir=self.storage,
            model_dir=bundle,
            device="cpu",
            settle_seconds=1.0,
            export_retry_seconds=2.0,
            destinations=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
        )
        if broker_url:
            values["broker_url"] = broker_url
        self.config = write_config(folder / "pleura.toml", **values)
        self.node = pleura_process("node", self.config, folder / "node.log")
        self.worker = pleura_process("worker", self.config, folder / "worker.log")
        wait_for(lambda: port_open(self.port) or not self.node.alive(), 60, "pleura node to listen")
        assert self.node.alive(), self.node.output()

    @property
    def ledger(self) -> Ledger:
        return Ledger(f"sqlite:///{self.storage / 'ledger.sqlite'}")

    def storescu(self, *files: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [find_tool("storescu"), *options, "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(self.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )

    def logs(self) -> str:
        return f"--- node ---\n{self.node.output()[-6000:]}\n--- worker ---\n{self.worker.output()[-6000:]}"

    def stop(self) -> None:
        self.worker.stop()
        self.node.stop()


def _results_for(orthanc: Orthanc, source_uid: str) -> dict[str, dict]:
    """Orthanc's SEG and SR instances that were made from `source_uid`, by kind."""
    found: dict[str, dict] = {}
    for tags in orthanc.instances():
        if tags.get("SOPInstanceUID") == source_uid:
            continue
        kind = "SEG" if tags.get("Modality") == "SEG" else "SR" if tags.get("Modality") == "SR" else None
        if kind:
            found.setdefault(kind, []).append(tags)
    return found


def _check_results(orthanc: Orthanc, source: pydicom.Dataset, folder: Path) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    """Download the SEG and SR made from `source`, check they are valid and reference it."""
    segs, srs = [], []
    for tags in orthanc.instances():
        path = orthanc.download(tags["_id"], folder / f"{tags['_id']}.dcm")
        ds = pydicom.dcmread(path)
        if ds.StudyInstanceUID != source.StudyInstanceUID or ds.SOPInstanceUID == source.SOPInstanceUID:
            continue
        assert dciodvfy_errors(path) == [], f"dciodvfy errors in {ds.Modality} {path}"
        (segs if ds.Modality == "SEG" else srs).append(ds)
    assert len(segs) == 1 and len(srs) == 1, (len(segs), len(srs))
    seg, sr = segs[0], srs[0]
    assert seg.SOPClassUID == SEG_CLASS
    seg_refs = {
        inst.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    assert source.SOPInstanceUID in seg_refs
    sr_refs = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert {source.SOPInstanceUID, seg.SOPInstanceUID} <= sr_refs
    assert "DEMO" in seg.SeriesDescription.upper()
    return seg, sr


def _wait_for_results(orthanc: Orthanc, pleura: Pleura, study_uids: set[str]) -> None:
    def delivered() -> bool:
        assert pleura.node.alive(), pleura.logs()
        assert pleura.worker.alive(), pleura.logs()
        studies: dict[str, set[str]] = {}
        for tags in orthanc.instances():
            studies.setdefault(tags.get("StudyInstanceUID"), set()).add(tags.get("Modality"))
        return all({"SEG", "SR"} <= studies.get(uid, set()) for uid in study_uids)

    try:
        wait_for(delivered, RESULT_TIMEOUT, "SEG and SR of every study in Orthanc", interval=1.0)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pleura.logs()}") from None


def test_redis_path_real_radiograph_and_synthetic_to_orthanc(tmp_path, demo_bundle, orthanc, redis_server, synthetic_positive):
    real_path = pydicom_data_file("RG1_UNCR.dcm")
    real = pydicom.dcmread(real_path, stop_before_pixels=True)
    assert real.PhotometricInterpretation == "MONOCHROME1" and real.BitsStored == 15
    synth_path, synth = synthetic_positive

    pleura = Pleura(tmp_path, demo_bundle, orthanc, redis_server.url)
    try:
        echo = subprocess.run(
            [find_tool("echoscu"), "-aec", "PLEURA", "127.0.0.1", str(pleura.port)], capture_output=True, text=True
        )
        assert echo.returncode == 0, echo.stderr
        sent = pleura.storescu(real_path, synth_path)
        assert sent.returncode == 0, sent.stderr
        _wait_for_results(orthanc, pleura, {real.StudyInstanceUID, synth.StudyInstanceUID})

        _check_results(orthanc, real, tmp_path)
        seg, sr = _check_results(orthanc, synth, tmp_path)
        assert seg.pixel_array.any(), "the synthetic pneumothorax was not segmented"

        ledger = pleura.ledger
        wait_for(
            lambda: ledger.study_status(synth.StudyInstanceUID)["status"] == "delivered", 60, "the ledger to say delivered"
        )
        synth_status = ledger.study_status(synth.StudyInstanceUID)
        assert synth_status["flagged"] is True, synth_status
        assert synth_status["probability"] >= 0.5
        wait_for(
            lambda: ledger.study_status(real.StudyInstanceUID)["status"] == "delivered", 60, "the real study delivered"
        )
        real_status = ledger.study_status(real.StudyInstanceUID)
        assert real_status["model_name"] == "pleura-demo" and real_status["synthetic_model"] is True
        assert 0.0 <= real_status["probability"] <= 1.0
        assert real_status["area_cm2"] is None  # RG1 carries Pixel Spacing 0\0: no physical size
    finally:
        pleura.stop()


def test_embedded_broker_path_and_resend_makes_no_duplicate_work(tmp_path, demo_bundle, orthanc, synthetic_positive):
    synth_path, synth = synthetic_positive
    real_path = pydicom_data_file("RG1_J2KR.dcm")  # the same radiograph, JPEG 2000 lossless this time
    real = pydicom.dcmread(real_path, stop_before_pixels=True)
    pleura = Pleura(tmp_path, demo_bundle, orthanc, broker_url=None)
    try:
        assert pleura.storescu(synth_path).returncode == 0
        sent = pleura.storescu(real_path, options=("-xv",))  # propose JPEG 2000 lossless
        assert sent.returncode == 0, sent.stderr
        _wait_for_results(orthanc, pleura, {synth.StudyInstanceUID, real.StudyInstanceUID})
        _check_results(orthanc, synth, tmp_path)
        _check_results(orthanc, real, tmp_path)
        ledger = pleura.ledger
        wait_for(
            lambda: ledger.study_status(synth.StudyInstanceUID)["status"] == "delivered", 60, "the ledger to say delivered"
        )
        before = len(orthanc.instances())

        # The modality sends the same image again: stored once, analysed once.
        assert pleura.storescu(synth_path).returncode == 0
        time.sleep(4 * 1.0)  # several settle periods: long enough for a wrong second dispatch to show
        received = re.findall(r"Task pleura\.analyse_study\[[0-9a-f-]+\] received", pleura.worker.output())
        assert len(received) == 2, pleura.logs()  # one task per study, none for the re-sent image
        status = ledger.study_status(synth.StudyInstanceUID)
        assert status["status"] == "delivered"
        assert status["instances"] == 1
        assert len(orthanc.instances()) == before
    finally:
        pleura.stop()
