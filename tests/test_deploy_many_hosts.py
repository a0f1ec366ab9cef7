"""Many hosts: `pleura node` with a PostgreSQL ledger and a Redis broker, its export worker as a
process of its own (`pleura export-worker`, as in docker/compose.yaml), and two `pleura worker`
processes that share nothing with it but the broker and an S3-compatible object store (moto's
server). Each worker has its own storage directory and a database URL that points nowhere.
Studies sent with storescu are each analysed exactly once and their results reach Orthanc; the
node's /metrics show it, its logs are JSON lines without identifiers, and a worker's /readyz
checks what a worker needs."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from config.settings import load_settings
from contract.active import RegistryLayout
from node.ledger import Ledger
from node.privacy import ref
from services import (
    MotoS3, Orthanc, PostgresCluster, RedisServer, find_tool, free_port, http_get, metric_sample, pleura_process,
    port_open, wait_for, write_config,
)
from training.synthetic import synthetic_dicom
from contract.celery_app import make_celery

STUDIES = 4
TIMEOUT = 300


def _json_lines(output: str, who: str) -> list[dict]:
    entries = []
    for line in output.splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"{who} wrote a line that is not JSON: {line[:300]!r}")
    return entries


@pytest.fixture
def peers(tmp_path):
    started = []
    try:
        for make in (lambda: PostgresCluster(), lambda: RedisServer(tmp_path / "redis"), lambda: MotoS3(),
                     lambda: Orthanc(tmp_path / "orthanc")):
            started.append(make())
        yield started
    finally:
        for peer in reversed(started):
            peer.stop()


def test_node_and_two_workers_share_only_the_broker_and_the_object_store(tmp_path, demo_bundle, peers):
    postgres, redis, s3, orthanc = peers
    ledger_url = postgres.new_database_url()
    shared_url = s3.url("site-a")
    common = dict(broker_url=redis.url, shared_storage_url=shared_url, log_format="json", model_bundle_dir=demo_bundle)
    node_port, metrics_port, worker_metrics_port = free_port(), free_port(), free_port()
    destination = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port, "objects": ["SR", "SEG"]}
    node_config = write_config(
        tmp_path / "node.toml", ae_title="PLEURA", host="127.0.0.1", port=node_port, storage_dir=tmp_path / "node",
        database_url=ledger_url, settle_seconds=1.0, export_retry_seconds=2.0, metrics_port=metrics_port,
        destinations=[destination], **common,
    )
    workers, worker_dirs = [], []
    for index in (1, 2):
        folder = tmp_path / f"worker{index}"
        worker_dirs.append(folder)
        config = write_config(
            tmp_path / f"worker{index}.toml", storage_dir=folder, device="cpu",
            database_url="postgresql+psycopg://nobody@127.0.0.1:9/no-such-ledger",  # a worker never opens it
            worker_metrics_port=worker_metrics_port if index == 1 else 0, **common,
        )
        workers.append(pleura_process("worker", config, tmp_path / f"worker{index}.log", extra_env=s3.env))
    # As in docker/compose.yaml: the node without its export worker, which runs on its own.
    node = pleura_process("node", node_config, tmp_path / "node.log", extra_env=s3.env, args=("--no-export-worker",))
    export_port = free_port()
    exporter = pleura_process(
        "export-worker", node_config, tmp_path / "export-worker.log",
        extra_env={**s3.env, "PLEURA_METRICS_PORT": str(export_port)},  # beside the node on one host
    )

    def logs() -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.output()[-4000:]}" for p in (node, exporter, *workers))

    try:
        wait_for(lambda: port_open(node_port) or not node.alive(), 60, "pleura node to listen")
        assert node.alive(), logs()
        # Both workers consume (each answers a ping over the broker), their models warm by their reports.
        control = make_celery(load_settings(broker_url=redis.url, storage_dir=tmp_path / "control")).control

        def both_consuming() -> bool:
            assert all(w.alive() for w in workers), logs()
            # The export worker answers too: count the analysis workers.
            names = {name for reply in control.ping(timeout=1.0) for name in reply}
            return len({name for name in names if name.startswith("analyse-")}) == 2

        wait_for(both_consuming, 600, "both workers consuming", interval=1.0)
        for folder in worker_dirs:
            [report] = RegistryLayout(folder / "models").workers()
            assert report["state"] == "ready" and report["loaded"].startswith("pleura-demo "), report

        files, studies = [], {}
        for seed in range(STUDIES):
            dataset, _ = synthetic_dicom(seed=500 + seed, positive=seed % 2 == 0, size=256)
            path = tmp_path / f"study{seed}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            files.append(path)
            studies[dataset.StudyInstanceUID] = dataset
        assert len(studies) == STUDIES
        sent = subprocess.run(
            [find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(node_port), *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr

        ledger = Ledger(ledger_url)

        def delivered() -> bool:
            assert node.alive() and exporter.alive() and all(w.alive() for w in workers), logs()
            statuses = {uid: (ledger.study_status(uid) or {}).get("status") for uid in studies}
            assert not {"failed", "delivery_failed", "not_analysed"} & set(statuses.values()), (statuses, logs())
            return all(status == "delivered" for status in statuses.values())

        try:
            wait_for(delivered, TIMEOUT, "every study delivered", interval=1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None

        # Each study analysed exactly once, by one worker or the other; both took part.
        done_by: dict[str, list[int]] = {}
        for index, worker in enumerate(workers):
            for entry in _json_lines(worker.output(), f"worker {index + 1}"):
                if "pleura.analyse_study" in entry["message"] and " succeeded in " in entry["message"]:
                    study_ref = re.search(r"'study': '(#[0-9a-f]+)'", entry["message"]).group(1)
                    done_by.setdefault(study_ref, []).append(index)
        assert sorted(done_by) == sorted(ref(uid) for uid in studies), (done_by, logs())
        assert all(len(who) == 1 for who in done_by.values()), done_by
        assert {who[0] for who in done_by.values()} == {0, 1}, done_by

        results = {uid: ledger.list_results(uid) for uid in studies}
        outbox = ledger.list_outbox()
        for uid, study in results.items():
            flagged = ledger.study_status(uid)["flagged"]
            assert sorted(r.kind for r in study) == (["SEG", "SR"] if flagged else ["SR"])
        assert len(outbox) == sum(len(r) for r in results.values())
        assert all(entry.status == "sent" and entry.attempts == 1 for entry in outbox), outbox
        in_pacs = {tags["SOPInstanceUID"] for tags in orthanc.instances()}
        assert {r.sop_instance_uid for study in results.values() for r in study} <= in_pacs

        # Images and results went through the object store; the workers kept nothing, and never
        # had the node's files or ledger.
        keys = s3.keys()
        for uid, dataset in studies.items():
            assert f"site-a/instances/{uid}/{dataset.SeriesInstanceUID}/{dataset.SOPInstanceUID}.dcm" in keys
            assert all(f"site-a/{r.storage_key}" in keys for r in results[uid])
        for folder in worker_dirs:
            left = [p for p in folder.rglob("*.dcm")]
            assert left == [] and not (folder / "ledger.sqlite").exists(), left

        # The node's metrics show what happened on the other hosts.
        status, metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        flagged = sum(1 for uid in studies if ledger.study_status(uid)["flagged"])
        assert metric_sample(metrics, "pleura_instances_received_total") == STUDIES
        assert metric_sample(metrics, "pleura_analysis_seconds_count") == STUDIES
        assert 0 < metric_sample(metrics, "pleura_analysis_seconds_sum") < TIMEOUT * STUDIES
        assert metric_sample(metrics, "pleura_time_to_flag_seconds_count") == flagged
        outcomes = sum(metric_sample(metrics, "pleura_analyses_total", outcome=o) or 0 for o in ("flagged", "not_flagged"))
        assert outcomes == STUDIES
        label = f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}"
        assert metric_sample(metrics, "pleura_deliveries_total", destination=label) == len(outbox)
        assert metric_sample(metrics, "pleura_delivery_failures_total", destination=label) == 0
        assert metric_sample(metrics, "pleura_queue_depth", queue="radiograph") == 0
        assert metric_sample(metrics, "pleura_broker_up") == 1
        status, ready = http_get(f"http://127.0.0.1:{metrics_port}/readyz")
        assert status == 200 and set(json.loads(ready)["checks"]) == {"ledger", "broker", "storage", "shared_storage", "model"}

        status, ready = http_get(f"http://127.0.0.1:{export_port}/readyz")
        report = json.loads(ready)
        assert status == 200 and report["role"] == "export-worker", report
        assert set(report["checks"]) == {"ledger", "broker", "storage", "shared_storage"}

        # A worker's own readiness: broker, its cache, the object store and the model; no ledger.
        status, ready = http_get(f"http://127.0.0.1:{worker_metrics_port}/readyz")
        report = json.loads(ready)
        assert status == 200 and report["role"] == "worker", report
        assert set(report["checks"]) == {"broker", "storage", "shared_storage", "model"}

        # JSON logs, one object a line, naming studies by reference only.
        outputs = {"node": node.output(), "export worker": exporter.output(), "worker 1": workers[0].output(),
                   "worker 2": workers[1].output()}
        assert any("stored instance" in e["message"] for e in _json_lines(outputs["node"], "the node"))
        exported = _json_lines(outputs["export worker"], "the export worker")
        assert any("recorded analysis of study" in e["message"] for e in exported)
        for who, text in outputs.items():
            _json_lines(text, who)
            for uid, dataset in studies.items():
                assert uid not in text and dataset.SOPInstanceUID not in text, f"{who} logged a UID"
                assert str(dataset.PatientID) not in text, f"{who} logged a patient ID"
    finally:
        node.stop()
        exporter.stop()
        for worker in workers:
            worker.stop()
