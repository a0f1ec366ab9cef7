"""The node service as a whole: SCP, settle loop, dispatch to Redis, the export worker child
process (a real Celery worker) delivering to storescp, restart of that child, and clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicom_peers
from config.destinations import Destination
from config.settings import Settings
from node.ledger import Ledger
from node.service import NodeService, OutboxSweeper, make_delivery_enqueuer, settings_environment
from test_node_dispatch import Redis, next_message
from contract.tasks import ANALYSE_STUDY, DELIVER_RESULT, EXPORT_QUEUE, RECORD_ANALYSIS
from contract.celery_app import make_celery

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis", dicom_peers.free_port())
    yield server
    server.stop()


def write_seg(storage: Path, study_uid: str) -> dict[str, Any]:
    ds = Dataset()
    ds.SOPClassUID = SEG_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    key = f"results/{study_uid}/{ds.SOPInstanceUID}.dcm"
    (storage / key).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(storage / key, enforce_file_format=True)
    return {
        "kind": "SEG",
        "key": key,
        "sop_instance_uid": ds.SOPInstanceUID,
        "sop_class_uid": SEG_CLASS,
        "source_sop_instance_uid": None,
    }


def test_settings_environment_round_trips_every_setting(tmp_path: Path) -> None:
    settings = Settings(
        storage_dir=tmp_path,
        port=4242,
        settle_seconds=1.5,
        broker_url="redis://127.0.0.1:1/0",
        destinations=[Destination(ae_title="PACS", host="10.0.0.5", port=104, max_attempts=3)],
    )
    env = settings_environment(settings, base={"PLEURA_DATABASE_URL": "sqlite:///elsewhere.db", "PATH": "/bin"})

    assert "PLEURA_DATABASE_URL" not in env  # unset here, so the child must not inherit another value
    assert env["PATH"] == "/bin"
    child = subprocess.run(
        [sys.executable, "-c", "from config.settings import load_settings; print(load_settings().model_dump_json())"],
        env={**env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Settings.model_validate_json(child.stdout) == settings


def test_node_service_receives_dispatches_and_exports(tmp_path: Path, redis: Redis) -> None:
    storage = tmp_path / "storage"
    with dicom_peers.StoreSCP(tmp_path / "pacs", ae_title="PACS") as pacs:
        settings = Settings(
            storage_dir=storage,
            host="127.0.0.1",
            port=dicom_peers.free_port(),
            metrics_port=dicom_peers.free_port(),  # its own, not one another node on the host holds
            settle_seconds=0.5,
            broker_url=f"redis://127.0.0.1:{redis.port}/0",
            export_retry_seconds=1,
            export_threads=3,
            destinations=[Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port)],
        )
        service = NodeService(settings, export_worker=True)
        service.start()
        try:
            command = service.export_worker.command  # its threads: the export_threads setting
            assert command[command.index("-c") + 1] == "3"
            assert dicom_peers.echoscu(settings.port, "PLEURA").returncode == 0
            source = dicom_peers.testdata_file("RG1_UNCR.dcm")
            study_uid = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
            sent = dicom_peers.storescu(settings.port, [source], called_ae="PLEURA")
            assert sent.returncode == 0, sent.stderr

            # Settled and dispatched to the radiograph queue, by reference.
            app = make_celery(settings)
            headers, (args, _, _) = next_message(app)
            assert headers["task"] == ANALYSE_STUDY
            assert args[0] == study_uid and [i["key"] for i in args[1]] == [
                i.storage_key for i in service.ledger.list_instances(study_uid)
            ]
            dicom_peers.wait_for(
                lambda: service.ledger.study_status(study_uid)["status"] == "queued", 10, "the study to be queued"
            )

            # What a worker sends back is recorded and delivered by the export worker child.
            seg = write_seg(storage, study_uid)
            sop_uid = args[1][0]["sop_instance_uid"]
            app.send_task(
                RECORD_ANALYSIS,
                args=[
                    {
                        "study_uid": study_uid,
                        "model": {"name": "m", "version": "1", "synthetic_demo": True},
                        "images": [
                            {
                                "sop_instance_uid": sop_uid,
                                "status": "analysed",
                                "reason": None,
                                "probability": 0.2,
                                "flagged": False,
                                "area_px": 0,
                                "area_cm2": 0.0,
                            }
                        ],
                        "results": [seg],
                        "flagged": False,
                        "analysed_at": "2025-03-01T08:00:00+00:00",
                    }
                ],
            )
            dicom_peers.wait_for(lambda: pacs.received(), 60, "the export worker to deliver the SEG")
            assert pydicom.dcmread(pacs.received()[0]).SOPInstanceUID == seg["sop_instance_uid"]
            dicom_peers.wait_for(
                lambda: service.ledger.study_status(study_uid)["status"] == "delivered", 20, "the study to be delivered"
            )
            assert service.ledger.study_status(study_uid)["probability"] == pytest.approx(0.2)

            # The export worker is restarted when it dies.
            worker = service.export_worker
            first_pid = worker.pid
            os.kill(first_pid, signal.SIGKILL)
            second_pid = dicom_peers.wait_for(
                lambda: worker.pid if worker.pid not in (None, first_pid) else None, 30, "the export worker to restart"
            )
            assert worker.restarts == 1
        finally:
            service.stop()

    assert not dicom_peers.port_open(settings.port)
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(second_pid, 0)


def test_the_outbox_sweeper_re_enqueues_a_lost_delivery(tmp_path: Path, redis: Redis) -> None:
    settings = Settings(storage_dir=tmp_path, broker_url=f"redis://127.0.0.1:{redis.port}/0")
    app = make_celery(settings)
    ledger = Ledger(settings.ledger_url)
    ledger.record_instance(
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_instance_uid="1.2.3.9",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        storage_key="instances/1.2.3/1.2.3.9/1.2.3.4.dcm",
    )
    ledger.mark_queued("1.2.3")
    ledger.record_analysis(
        {
            "study_uid": "1.2.3",
            "model": {"name": "m", "version": "1"},
            "images": [{"sop_instance_uid": "1.2.3.4", "status": "analysed", "probability": 0.1, "flagged": False}],
            "results": [write_seg(tmp_path, "1.2.3")],
            "flagged": False,
            "analysed_at": "2025-03-01T08:00:00+00:00",
        }
    )
    created = datetime(2025, 3, 1, 8, 0, tzinfo=timezone.utc)
    [outbox_id] = ledger.create_outbox("1.2.3", ["PACS@127.0.0.1:104"], now=created)
    sweeper = OutboxSweeper(ledger, make_delivery_enqueuer(app), margin_seconds=60)

    assert sweeper.run_once(now=created + timedelta(seconds=59)) == []
    assert sweeper.run_once(now=created + timedelta(seconds=61)) == [outbox_id]
    assert sweeper.run_once(now=created + timedelta(seconds=62)) == []

    headers, (args, _, _) = next_message(app, EXPORT_QUEUE)
    assert (headers["task"], args) == (DELIVER_RESULT, [outbox_id])
    ledger.close()


def test_run_node_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = dicom_peers.free_port()
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
        "from config.settings import load_settings\n"
        "from node.service import run_node\n"
        "run_node(load_settings(), export_worker=False)\n"
    )
    env = {
        **os.environ,
        "PLEURA_STORAGE_DIR": str(tmp_path / "storage"),
        "PLEURA_HOST": "127.0.0.1",
        "PLEURA_PORT": str(port),
        "PLEURA_METRICS_PORT": str(dicom_peers.free_port()),
        "PLEURA_BROKER_URL": f"redis://127.0.0.1:{dicom_peers.free_port()}/0",
    }
    node = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        dicom_peers.wait_for(lambda: dicom_peers.port_open(port) or node.poll() is not None, 30, "the node to listen")
        assert node.poll() is None, node.stderr.read()
        assert dicom_peers.echoscu(port, "PLEURA").returncode == 0
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0
        log = node.stderr.read()
        assert "received SIGTERM; stopping" in log and "DICOM SCP stopped" in log
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
