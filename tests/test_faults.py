"""Faults the node must survive with nothing acknowledged lost, each against real processes.

`pleura node` killed with SIGKILL in the middle of an association and restarted; a `pleura worker`
killed in the middle of a task; Redis stopped for a minute while the node keeps receiving. After each, every
instance the node acknowledged is on disk and in the ledger, is analysed, and each of its results
is delivered to Orthanc once (one outbox row per result and destination, sent).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from dicom_samples import dciodvfy_errors
from node.ledger import Ledger
from services import Orthanc, RedisServer, free_port, pleura_process, port_open, wait_for, write_config
from training.synthetic import synthetic_dicom

RESULT_TIMEOUT = 600
"""Generous: the suite must pass on a loaded 2-core machine (worker warm-up, then the analyses)."""
REDIS_OUTAGE_SECONDS = 60


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


def studies(count: int, images: int, size: int = 256, seed: int = 500) -> list[pydicom.Dataset]:
    """`count` studies of `images` synthetic radiographs each (the first of each study positive)."""
    datasets = []
    for study in range(count):
        first = None
        for image in range(images):
            ds, _ = synthetic_dicom(seed=seed + 100 * study + image, positive=image == 0, size=size)
            if first is None:
                first = ds
            ds.StudyInstanceUID, ds.PatientID, ds.PatientName = first.StudyInstanceUID, first.PatientID, first.PatientName
            datasets.append(ds)
    return datasets


class Node:
    """A configuration and the `pleura node` / `pleura worker` processes run on it."""

    def __init__(self, folder: Path, bundle: Path, orthanc: Orthanc, **values: object) -> None:
        self.folder = folder
        self.port = free_port()
        self.storage = folder / "storage"
        self.config = write_config(
            folder / "pleura.toml",
            ae_title="PLEURA", host="127.0.0.1", port=self.port, storage_dir=self.storage, model_bundle_dir=bundle,
            device="cpu", settle_seconds=1.0, export_retry_seconds=2.0,
            destinations=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
            **values,
        )
        self.orthanc = orthanc
        self.node = self.worker = None
        self.runs = 0

    def start_node(self) -> None:
        self.runs += 1
        self.node = pleura_process("node", self.config, self.folder / f"node-{self.runs}.log")
        wait_for(lambda: port_open(self.port) or not self.node.alive(), 60, "pleura node to listen")
        assert self.node.alive(), self.node.output()

    def start_worker(self) -> None:
        self.runs += 1
        self.worker = pleura_process("worker", self.config, self.folder / f"worker-{self.runs}.log")

    def ledger(self) -> Ledger:
        return Ledger(f"sqlite:///{self.storage / 'ledger.sqlite'}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        for process in (self.worker, self.node):
            if process is not None:
                process.stop()


def send(port: int, datasets: list[pydicom.Dataset], acknowledged: list[str], pause: float = 0.0) -> None:
    """C-STORE each data set in one association, recording the SOP Instance UIDs answered 0x0000;
    stops at the first that gets no answer (the association is gone)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.DigitalXRayImageStorageForPresentation, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            if not assoc.is_established:
                return
            status = assoc.send_c_store(ds)
            if "Status" not in status:
                return
            if status.Status == 0x0000:
                acknowledged.append(str(ds.SOPInstanceUID))
            time.sleep(pause)
    finally:
        if assoc.is_established:
            assoc.release()


def processes_with(marker: str, storage: Path) -> list[int]:
    """Pids whose command line contains `marker` and whose environment names `storage`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and str(storage).encode() in environ:
            found.append(int(entry.name))
    return found


def wait_until_analysing(pleura: Node, datasets: list[pydicom.Dataset], count: int) -> None:
    """Until ``count`` of the studies have been taken by a worker: the ledger has the worker's
    ``pleura.analysis_started`` message (node/progress.py), sent as its task starts."""
    ledger = pleura.ledger()
    study_uids = sorted({str(ds.StudyInstanceUID) for ds in datasets})

    def started() -> bool:
        assert pleura.worker.alive(), pleura.logs()
        return sum(ledger.analysis_started_at(uid) is not None for uid in study_uids) >= count

    try:
        wait_for(started, RESULT_TIMEOUT, f"a worker to take {count} of the studies", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pleura.logs()}") from None
    finally:
        ledger.close()


def assert_everything_delivered_once(pleura: Node, datasets: list[pydicom.Dataset]) -> None:
    """Every instance analysed; every study delivered; one sent outbox row per result, nothing else
    at the PACS."""
    ledger = pleura.ledger()
    study_uids = {str(ds.StudyInstanceUID) for ds in datasets}

    def delivered() -> bool:
        statuses = [(ledger.study_status(uid) or {}).get("status") for uid in study_uids]
        assert "failed" not in statuses and "delivery_failed" not in statuses, (statuses, pleura.logs())
        return all(status == "delivered" for status in statuses)

    try:
        wait_for(delivered, RESULT_TIMEOUT, "every study delivered", interval=1.0)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pleura.logs()}") from None
    results = 0
    for uid in study_uids:
        for instance in ledger.list_instances(uid):
            assert instance.analysis_status == "analysed", instance
            assert (pleura.storage / instance.storage_key).is_file()
        rows = ledger.list_outbox(uid)
        study_results = ledger.list_results(uid)
        assert sorted(row.result_uid for row in rows) == sorted(r.sop_instance_uid for r in study_results)
        assert all(row.status == "sent" for row in rows)
        results += len(study_results)
    instances = {str(ds.SOPInstanceUID) for ds in datasets}
    assert {i.sop_instance_uid for uid in study_uids for i in ledger.list_instances(uid)} == instances
    at_pacs = [t for t in pleura.orthanc.instances() if t.get("StudyInstanceUID") in study_uids]
    assert len(at_pacs) == results  # each result once (Orthanc keeps one copy per SOP Instance UID)
    ledger.close()


def test_a_node_killed_mid_association_loses_nothing_it_acknowledged(tmp_path, demo_bundle, orthanc):
    datasets = studies(3, 4)
    pleura = Node(tmp_path, demo_bundle, orthanc)
    try:
        pleura.start_node()
        pleura.start_worker()
        acknowledged: list[str] = []
        sender = threading.Thread(target=send, args=(pleura.port, datasets, acknowledged, 0.3))
        sender.start()
        wait_for(lambda: len(acknowledged) >= 5, 60, "five instances acknowledged")
        os.kill(pleura.node.proc.pid, signal.SIGKILL)
        sender.join(60)
        assert 5 <= len(acknowledged) < len(datasets)
        # Its export worker goes with it: a restarted node never has two.
        wait_for(lambda: not processes_with("node.celery_entry", pleura.storage), 20, "the export worker to end")

        # Everything acknowledged is on disk and in the ledger, before any restart.
        ledger = pleura.ledger()
        for uid in acknowledged:
            assert ledger.has_instance(uid)
        for study in {str(ds.StudyInstanceUID) for ds in datasets}:
            for instance in ledger.list_instances(study):
                assert (pleura.storage / instance.storage_key).is_file()
        ledger.close()

        pleura.start_node()
        # The modality sends again what was not acknowledged (and, to be sure, one that was).
        unacknowledged = [ds for ds in datasets if str(ds.SOPInstanceUID) not in acknowledged]
        again: list[str] = []
        send(pleura.port, unacknowledged + [datasets[0]], again)
        assert len(again) == len(unacknowledged) + 1
        assert_everything_delivered_once(pleura, datasets)
        assert len(processes_with("node.celery_entry", pleura.storage)) == 1
    finally:
        pleura.stop()


def kill_worker_mid_analysis(pleura: Node, datasets: list[pydicom.Dataset], count: int = 1) -> datetime:
    """SIGKILL the worker's process group once it has taken ``count`` of the studies, while their
    instances are still queued (mid-task, not after it); the time of the kill."""
    wait_until_analysing(pleura, datasets, count)
    ledger = pleura.ledger()
    try:
        queued = [i for ds in datasets for i in ledger.list_instances(str(ds.StudyInstanceUID))
                  if i.analysis_status == "queued"]
    finally:
        ledger.close()
    worker = pleura.worker
    os.killpg(worker.proc.pid, signal.SIGKILL)
    killed_at = datetime.now(timezone.utc)
    worker.proc.wait(10)
    assert queued, "the analysis ended before the kill: the study is too small to be killed mid-task"
    return killed_at


def wait_until_analysed_again(pleura: Node, datasets: list[pydicom.Dataset], after: datetime) -> float:
    """Until a worker starts on each study again after ``after``; the seconds it took."""
    ledger = pleura.ledger()
    study_uids = sorted({str(ds.StudyInstanceUID) for ds in datasets})

    def started_again() -> bool:
        return all((ledger.analysis_started_at(uid) or after) > after for uid in study_uids)

    try:
        wait_for(started_again, RESULT_TIMEOUT, "a worker to start on every study again", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pleura.logs()}") from None
    finally:
        ledger.close()
    return (datetime.now(timezone.utc) - after).total_seconds()


def test_a_worker_killed_mid_task_is_replaced_and_the_results_arrive_once(tmp_path, demo_bundle, orthanc):
    """The analysis timeout stays at its default hour: the study comes back through its lease
    (node/ledger/leases.py) once its heartbeats stop, on the embedded broker, which keeps no
    message of the killed worker."""
    datasets = studies(1, 30, size=512, seed=700)
    pleura = Node(tmp_path, demo_bundle, orthanc)
    try:
        pleura.start_node()
        pleura.start_worker()
        acknowledged: list[str] = []
        send(pleura.port, datasets, acknowledged)
        assert len(acknowledged) == len(datasets)
        killed_at = kill_worker_mid_analysis(pleura, datasets)
        pleura.start_worker()
        print(f"recovered: analysed again {wait_until_analysed_again(pleura, datasets, killed_at):.1f} s after the kill")
        assert_everything_delivered_once(pleura, datasets)
    finally:
        pleura.stop()


def test_a_study_that_kills_its_worker_twice_is_reported_not_analysed(tmp_path, demo_bundle, orthanc):
    """Killed twice while analysing the same study: the third dispatch writes a "not analysed"
    report naming the reason without running the networks; the report reaches the PACS, and the
    worklist shows the study as not analysed, with why."""
    datasets = studies(1, 30, size=512, seed=720)
    study_uid = str(datasets[0].StudyInstanceUID)
    pleura = Node(tmp_path, demo_bundle, orthanc)
    try:
        pleura.start_node()
        pleura.start_worker()
        acknowledged: list[str] = []
        send(pleura.port, datasets, acknowledged)
        assert len(acknowledged) == len(datasets)
        killed_at = kill_worker_mid_analysis(pleura, datasets)
        pleura.start_worker()
        wait_until_analysed_again(pleura, datasets, killed_at)
        kill_worker_mid_analysis(pleura, datasets)
        pleura.start_worker()

        ledger = pleura.ledger()
        try:
            wait_for(lambda: (ledger.study_status(study_uid) or {}).get("status") == "not_analysed",
                     RESULT_TIMEOUT, "the study to be reported not analysed", interval=1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{pleura.logs()}") from None
        status = ledger.study_status(study_uid)
        assert "analysis crashed twice" in status["reason"]
        assert all(i.analysis_status == "not_analysed" for i in ledger.list_instances(study_uid))
        [report] = ledger.list_results(study_uid)
        assert report.kind == "SR"
        wait_for(lambda: all(row.status == "sent" for row in ledger.list_outbox(study_uid)), RESULT_TIMEOUT,
                 "the report delivered")
        ledger.close()
        [at_pacs] = [t for t in orthanc.instances() if t.get("StudyInstanceUID") == study_uid]
        assert at_pacs["SOPInstanceUID"] == report.sop_instance_uid
        sr = pydicom.dcmread(orthanc.download(at_pacs["_id"], tmp_path / "report.dcm"))
        texts = [item.TextValue for item in sr.ContentSequence if item.ValueType == "TEXT"]
        assert any("not analysed: the analysis crashed twice" in text for text in texts)
        assert dciodvfy_errors(tmp_path / "report.dcm") == []
    finally:
        pleura.stop()


def test_the_node_keeps_receiving_while_redis_is_down(tmp_path, demo_bundle, orthanc):
    redis = RedisServer(tmp_path / "redis")
    datasets = studies(2, 2, seed=900)
    pleura = Node(tmp_path, demo_bundle, orthanc, broker_url=redis.url)
    try:
        pleura.start_node()
        pleura.start_worker()
        redis.stop()
        acknowledged: list[str] = []
        send(pleura.port, datasets, acknowledged)
        assert len(acknowledged) == len(datasets)  # stored and recorded without the broker
        time.sleep(REDIS_OUTAGE_SECONDS)  # dispatch fails every settle round; the worker loses its broker
        ledger = pleura.ledger()
        statuses = {(ledger.study_status(str(ds.StudyInstanceUID)) or {}).get("status") for ds in datasets}
        assert statuses == {"receiving"}  # nothing marked queued that the broker never took
        ledger.close()
        redis.start()
        assert_everything_delivered_once(pleura, datasets)
    finally:
        pleura.stop()
        redis.stop()


def test_a_batching_worker_killed_with_studies_in_flight_loses_none_of_them(tmp_path, demo_bundle, orthanc):
    """`worker_threads` 3: three studies in flight in one process (acknowledged only when done), on
    the Redis broker; killed, the process's unfinished studies come back, and each result reaches
    the PACS once."""
    redis = RedisServer(tmp_path / "redis")
    datasets = studies(3, 10, size=512, seed=900)
    # The Redis broker keeps the killed worker's three unacknowledged messages for its visibility
    # timeout (an hour): the leases bring the studies back in seconds all the same.
    pleura = Node(tmp_path, demo_bundle, orthanc, broker_url=redis.url, worker_threads=3, batch_wait_ms=200)
    try:
        pleura.start_node()
        pleura.start_worker()
        acknowledged: list[str] = []
        send(pleura.port, datasets, acknowledged)
        assert len(acknowledged) == len(datasets)
        killed_at = kill_worker_mid_analysis(pleura, datasets, 3)  # three studies in flight in the one process
        pleura.start_worker()
        print(f"recovered: analysed again {wait_until_analysed_again(pleura, datasets, killed_at):.1f} s after the kill")
        assert_everything_delivered_once(pleura, datasets)
    finally:
        pleura.stop()
        redis.stop()
