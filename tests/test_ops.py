"""Health, readiness and metrics of the node (node/ops/), the `pleura healthcheck` command, and
the JSON log format."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from config.settings import Settings
from dicom_peers import free_port, storescu, wait_for
from node.ledger import Ledger
from node.logs import make_formatter
from node.ops.health import Check, readiness_checks, run_checks
from node.ops.metrics import LedgerCollector, active_models
from node.service import NodeService
from pleura.cli import app as cli_app
from services import RedisServer, http_get, metric_sample
from contract.bundle import load_bundle
from training.synthetic import synthetic_dicom

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=timezone.utc)
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.80", "1.2.826.0.1.3680043.8.498.81"


def node_settings(tmp_path: Path, bundle: Path, **values) -> Settings:
    return Settings(
        storage_dir=tmp_path / "storage", host="127.0.0.1", port=free_port(), metrics_port=free_port(),
        model_bundle_dir=bundle, settle_seconds=0.2, **values,
    )


def test_the_node_serves_health_readiness_and_metrics(tmp_path, demo_bundle):
    settings = node_settings(tmp_path, demo_bundle)
    with NodeService(settings, export_worker=False, worklist=False, settle_interval_seconds=0.1):
        base = f"http://127.0.0.1:{settings.metrics_port}"
        assert http_get(f"{base}/healthz") == (200, '{"status":"ok","role":"node"}')
        status, body = http_get(f"{base}/readyz")
        report = json.loads(body)
        assert status == 200 and report["ready"] is True, report
        assert set(report["checks"]) == {"ledger", "broker", "storage", "model"}

        _, before = http_get(f"{base}/metrics")
        received = metric_sample(before, "pleura_instances_received_total") or 0.0
        assert metric_sample(before, "pleura_broker_up") == 1
        manifest = load_bundle(demo_bundle).manifest
        assert active_models(settings) == [{"name": manifest.name, "version": manifest.version, "kind": manifest.kind}]
        assert metric_sample(before, "pleura_model_active", name=manifest.name, version=manifest.version, kind=manifest.kind) == 1

        dataset, _ = synthetic_dicom(seed=11, positive=True, size=128)
        image = tmp_path / "image.dcm"
        dataset.save_as(image, enforce_file_format=True)
        sent = storescu(settings.port, [image], called_ae="PLEURA")
        assert sent.returncode == 0, sent.stderr
        # No worker runs: the dispatched study waits in the embedded broker's radiograph queue.
        wait_for(lambda: metric_sample(http_get(f"{base}/metrics")[1], "pleura_queue_depth", queue="radiograph") == 1, 30,
                 "the study to wait in the radiograph queue")
        _, after = http_get(f"{base}/metrics")
        assert metric_sample(after, "pleura_instances_received_total") == received + 1
        assert metric_sample(after, "pleura_queue_depth", queue="export") == 0

        runner = CliRunner()
        assert runner.invoke(cli_app, ["healthcheck", "--url", f"{base}/healthz"]).exit_code == 0
        assert runner.invoke(cli_app, ["healthcheck", "--url", f"{base}/readyz"]).exit_code == 0
        closed = runner.invoke(cli_app, ["healthcheck", "--url", f"http://127.0.0.1:{free_port()}/healthz"])
        assert closed.exit_code == 1 and "not healthy" in closed.output


def test_readiness_fails_while_the_broker_is_down(tmp_path, demo_bundle):
    redis = RedisServer(tmp_path / "redis")
    settings = node_settings(tmp_path, demo_bundle, broker_url=redis.url)
    try:
        with NodeService(settings, export_worker=False, worklist=False):
            base = f"http://127.0.0.1:{settings.metrics_port}"
            assert http_get(f"{base}/readyz")[0] == 200
            redis.stop()
            status, body = http_get(f"{base}/readyz")
            checks = json.loads(body)["checks"]
            assert status == 503 and checks["broker"]["ok"] is False, body
            assert checks["ledger"]["ok"] and checks["storage"]["ok"] and checks["model"]["ok"]
            assert http_get(f"{base}/healthz")[0] == 200  # alive all the same: only not ready
            assert metric_sample(http_get(f"{base}/metrics")[1], "pleura_broker_up") == 0
            redis.start()
            wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 30, "readiness to come back with the broker")
    finally:
        redis.stop()


def test_readiness_names_a_missing_model_unwritable_storage_and_a_hung_check(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    settings = Settings(storage_dir=not_a_folder, model_registry_dir=tmp_path / "no-bundle")
    report = run_checks(readiness_checks(settings))
    assert report["ready"] is False
    assert not report["checks"]["storage"]["ok"]
    assert not report["checks"]["model"]["ok"] and "manifest.json is missing" in report["checks"]["model"]["detail"]
    slow = run_checks([Check("slow", lambda: time.sleep(3) or "late")], timeout=0.2)
    assert slow == {"ready": False, "checks": {"slow": {"ok": False, "detail": "no answer within 0 s"}}}


def _record(ledger: Ledger, sop: str) -> None:
    ledger.record_instance(
        sop_instance_uid=sop, study_uid=STUDY, series_instance_uid=SERIES, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"instances/{STUDY}/{SERIES}/{sop}.dcm",
        calling_ae="MODALITY", patient_id="PID", accession_number="ACC", received_at=T0,
    )


def test_analysis_time_time_to_flag_and_deliveries_come_from_the_ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    collector = LedgerCollector(ledger, since=T0)
    registry = CollectorRegistry()
    registry.register(collector)
    _record(ledger, "1.2.3.1")
    ledger.mark_analysing(STUDY, "task-1", now=T0 + timedelta(seconds=10))
    results = [
        {"kind": kind, "key": f"results/{STUDY}/{uid}.dcm", "sop_instance_uid": uid, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.34",
         "source_sop_instance_uid": None}
        for kind, uid in (("SR", "1.2.3.91"), ("SEG", "1.2.3.92"))
    ]
    ledger.record_analysis({
        "study_uid": STUDY, "model": {"name": "m", "version": "1", "synthetic_demo": True},
        "images": [{"sop_instance_uid": "1.2.3.1", "status": "analysed", "reason": None, "probability": 0.9,
                    "flagged": True, "area_px": 100, "area_cm2": 1.0}],
        "results": results, "flagged": True, "analysed_at": (T0 + timedelta(seconds=40)).isoformat(),
    })
    first, second = ledger.create_outbox(STUDY, ["PACS@pacs:104"])
    ledger.record_delivery_failure(first, "refused", retry_seconds=1, max_attempts=5)
    ledger.record_delivery_success(first)
    ledger.record_delivery_failure(second, "refused", retry_seconds=1, max_attempts=1)

    for _ in range(2):  # a second scrape counts nothing twice
        assert registry.get_sample_value("pleura_analyses_total", {"outcome": "flagged"}) == 1
        assert registry.get_sample_value("pleura_analysis_seconds_count") == 1
        assert registry.get_sample_value("pleura_analysis_seconds_sum") == 30
        assert registry.get_sample_value("pleura_time_to_flag_seconds_sum") == 40
        assert registry.get_sample_value("pleura_time_to_flag_seconds_bucket", {"le": "60.0"}) == 1
        assert registry.get_sample_value("pleura_time_to_flag_seconds_bucket", {"le": "30.0"}) == 0
        assert registry.get_sample_value("pleura_deliveries_total", {"destination": "PACS@pacs:104"}) == 1
        assert registry.get_sample_value("pleura_delivery_failures_total", {"destination": "PACS@pacs:104"}) == 2
        assert registry.get_sample_value("pleura_deliveries_given_up_total", {"destination": "PACS@pacs:104"}) == 1
    ledger.close()


def test_json_log_lines_are_one_object_each():
    formatter = make_formatter("json")
    try:
        raise ValueError("bad value")
    except ValueError:
        import sys

        record = logging.LogRecord("node.scp", logging.ERROR, __file__, 1, "stored %s", ("ref-1",), sys.exc_info())
    record.data = {"args": [STUDY]}  # what Celery passes as `extra` with a task: never written
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "node.scp" and entry["message"] == "stored ref-1"
    assert "ValueError: bad value" in entry["exc_info"] and entry["time"].startswith(str(datetime.now().year))
    assert STUDY not in line and set(entry) == {"time", "level", "logger", "process", "thread", "message", "exc_info"}


def test_text_log_lines_show_control_characters_in_the_message_escaped():
    """A calling AE title (or any text a peer sends) with CR, LF or a terminal escape can neither
    forge a log line nor act on the terminal that shows the log."""
    formatter = make_formatter("text")
    forged = "EVIL\r\n2024-01-01 00:00:00,000 INFO node.scp: stored instance ref-0 from PACS\x1b[2J\x00\x85"
    record = logging.LogRecord("node.scp", logging.INFO, __file__, 1, "association from %s accepted", (forged,), None)
    line = formatter.format(record)
    assert len(line.splitlines()) == 1 and not any(char in line for char in "\r\n\x1b\x00\x85")
    assert line.endswith(
        "INFO node.scp: association from EVIL\\r\\n2024-01-01 00:00:00,000 INFO node.scp: stored instance ref-0"
        " from PACS\\x1b[2J\\x00\\x85 accepted"
    )
