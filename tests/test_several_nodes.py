"""Several nodes on one ledger: two `pleura node` processes (each with its export worker) share one
PostgreSQL ledger, one Redis broker and one storage directory (a shared file system), with one
analysis worker, one real MLLP listener and one Orthanc. Studies are sent to both nodes; each
flagged study is announced by exactly one HL7 message, and each result is sent to the PACS by
exactly one C-STORE (one `result-sent` in the audit trail, one attempt in the outbox)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections import Counter

import pytest

from node.ledger import Ledger
from node.privacy import ref
from notify_peers import MllpListener
from services import (
    Orthanc, PostgresCluster, RedisServer, find_tool, free_port, pleura_process, port_open, wait_for, write_config,
)
from training.synthetic import synthetic_dicom

STUDIES = 6
TIMEOUT = 300


@pytest.fixture
def peers(tmp_path):
    started = []
    try:
        for make in (PostgresCluster, lambda: RedisServer(tmp_path / "redis"), lambda: Orthanc(tmp_path / "orthanc"),
                     MllpListener):
            started.append(make())
        yield started
    finally:
        for peer in reversed(started):
            peer.stop()


def test_two_nodes_on_one_ledger_send_each_notification_and_each_result_once(tmp_path, demo_bundle, peers):
    postgres, redis, orthanc, listener = peers
    ledger_url = postgres.new_database_url()
    storage = tmp_path / "storage"
    hl7 = json.dumps([{"host": "127.0.0.1", "port": listener.port, "receiving_application": "RIS",
                       "receiving_facility": "RAD", "timeout_seconds": 5}])
    destination = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port,
                   "objects": ["SR", "SEG", "GSPS"]}
    nodes, ports = [], []
    for index in (1, 2):
        port = free_port()
        config = write_config(
            tmp_path / f"node{index}.toml", ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=storage,
            database_url=ledger_url, broker_url=redis.url, model_bundle_dir=demo_bundle, device="cpu",
            settle_seconds=1.0, export_retry_seconds=2.0, metrics_port=free_port(), destinations=[destination],
        )
        env = {"PLEURA_HL7_DESTINATIONS": hl7}
        nodes.append(pleura_process("node", config, tmp_path / f"node{index}.log", extra_env=env))
        ports.append(port)
    worker = pleura_process("worker", tmp_path / "node1.toml", tmp_path / "worker.log")
    everyone = [*nodes, worker]

    def logs() -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.output()[-4000:]}" for p in everyone)

    try:
        for node, port in zip(nodes, ports):
            wait_for(lambda: port_open(port) or not node.alive(), 90, "pleura node to listen")
        assert all(p.alive() for p in everyone), logs()

        studies = {}
        for seed in range(STUDIES):
            dataset, _ = synthetic_dicom(seed=700 + seed, positive=seed % 2 == 0, size=256)
            path = tmp_path / f"study{seed}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            studies[dataset.StudyInstanceUID] = path
        # Half the studies to each node, from two senders at once.
        senders = [
            subprocess.Popen(
                [find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(port),
                 *map(str, list(studies.values())[index::2])],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for index, port in enumerate(ports)
        ]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err

        ledger = Ledger(ledger_url)
        flagged: set[str] = set()

        def settled() -> bool:
            assert all(p.alive() for p in everyone), logs()
            statuses = {uid: ledger.study_status(uid) or {} for uid in studies}
            assert not {"failed", "delivery_failed", "not_analysed"} & {s.get("status") for s in statuses.values()}, (
                statuses, logs())
            if not all(s.get("status") == "delivered" for s in statuses.values()):
                return False
            flagged.clear()
            flagged.update(uid for uid, s in statuses.items() if s["flagged"])
            notifications = ledger.list_notifications()
            return len(notifications) == len(flagged) and all(n.status == "sent" for n in notifications)

        try:
            wait_for(settled, TIMEOUT, "every study delivered and every flag announced", interval=1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None
        assert flagged, "the demo model flags the positive studies"

        # Each study dispatched by one node and analysed once.
        analysed = Counter(
            match.group(1) for match in re.finditer(r"pleura\.analyse_study\[[^]]+\] succeeded in .*?'study': '(#[0-9a-f]+)'",
                                                    worker.output())
        )
        assert analysed == Counter({ref(uid): 1 for uid in studies}), (analysed, logs())

        # Exactly one HL7 message per flagged study, none for the others.
        announced = Counter()
        for message in listener.messages:
            for obx in message.segments("OBX"):
                if str(obx[3][0][0]) == "STUDY-UID":
                    announced[str(obx[5])] += 1
        assert announced == Counter({uid: 1 for uid in flagged}), (announced, flagged)

        # Exactly one C-STORE per result: one successful send recorded, by one node or the other.
        results = {r.sop_instance_uid for uid in studies for r in ledger.list_results(uid)}
        outbox = ledger.list_outbox()
        assert len(outbox) == len(results) and all(e.status == "sent" and e.attempts == 1 for e in outbox), outbox
        audit = [json.loads(line) for line in (storage / "audit.jsonl").read_text().splitlines() if line.strip()]
        sent = Counter(entry["sop_instance_uid"] for entry in audit if entry.get("event") == "result-sent")
        assert sent == Counter({uid: 1 for uid in results}), sent
        assert results <= {tags["SOPInstanceUID"] for tags in orthanc.instances()}
        ledger.close()
    finally:
        for process in reversed(everyone):
            process.stop()


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


def test_two_nodes_finding_the_same_flag_change_at_once_announce_it_once(postgres):
    """Both nodes' notification loops look for flag changes; on PostgreSQL two transactions could
    both see a withdrawn flag as unannounced and each queue a message. The barrier holds the first
    inside its look-up until the second arrives (or 3 s pass, when the second is kept out)."""
    from test_notify import STUDY, analysed_study

    url = postgres.new_database_url()
    first, second = Ledger(url), Ledger(url)
    analysed_study(first, flagged=True)
    message = {"channel": "hl7", "target": "RIS", "payload": "MSH", "max_attempts": 3}
    assert len(first.enqueue_flag_notifications(lambda study, event: [message])) == 1
    first.record_feedback(STUDY, "rejected", "dr.house")  # the flag is withdrawn: one message to queue
    both_inside = threading.Barrier(2, timeout=3)

    def build(study, event):
        try:
            both_inside.wait()
        except threading.BrokenBarrierError:
            pass
        return [message | {"payload": event}]

    created: list[list[int]] = []
    threads = [threading.Thread(target=lambda ledger=ledger: created.append(ledger.enqueue_flag_notifications(build)))
               for ledger in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(len(ids) for ids in created) == [0, 1], created
    events = [n.payload for n in first.list_notifications(STUDY)]
    assert sorted(events) == ["MSH", "withdrawn"], events
    first.close()
    second.close()


def test_two_nodes_settling_the_same_study_at_once_dispatch_it_once(postgres):
    """Both nodes' settle loops look for due studies; without taking turns both would send the same
    study to the workers. The barrier holds the first dispatch until the second loop dispatches too
    (or 3 s pass, when the second was kept out)."""
    from datetime import datetime, timedelta, timezone

    from node.settle import SettleLoop

    url = postgres.new_database_url()
    first, second = Ledger(url), Ledger(url)
    at = datetime.now(timezone.utc) - timedelta(minutes=1)
    study = "1.2.826.0.1.3680043.10.1234.77"
    first.record_instance(
        sop_instance_uid=study + ".1", study_uid=study, series_instance_uid=study + ".0",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
        storage_key="instances/x.dcm", received_at=at,
    )
    both_dispatching = threading.Barrier(2, timeout=3)
    sent: list[str] = []

    def dispatch(study_uid, instances):
        sent.append(study_uid)
        try:
            both_dispatching.wait()
        except threading.BrokenBarrierError:
            pass
        return f"task-{len(sent)}"

    loops = [SettleLoop(ledger, dispatch, settle_seconds=1.0) for ledger in (first, second)]
    threads = [threading.Thread(target=loop.run_once) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sent == [study]
    assert first.study_status(study)["status"] == "queued"
    first.close()
    second.close()
