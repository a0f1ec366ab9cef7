"""Dispatch of settled studies to real brokers: Redis (redis-server) and the embedded broker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import dicom_peers
from config.destinations import Destination
from config.settings import Settings
from node.dispatch import analysis_options, dispatch_analysis, make_dispatcher
from node.ledger import Ledger, utcnow
from node.settle import SettleLoop
from contract.tasks import ANALYSE_STUDY, RADIOGRAPH_QUEUE
from contract.celery_app import make_celery

INSTANCES = [{"sop_instance_uid": "1.2.3.4", "key": "instances/1.2.3/1.2.3.9/1.2.3.4.dcm"}]
CR = "1.2.840.10008.5.1.4.1.1.1"


class Redis:
    def __init__(self, folder: Path, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        server = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        dicom_peers.wait_for(lambda: dicom_peers.port_open(port) or self.process.poll() is not None, 20, "redis-server")
        assert self.process.poll() is None, "redis-server did not start"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture()
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis", dicom_peers.free_port())
    yield server
    server.stop()


def next_message(app: Celery, queue: str = RADIOGRAPH_QUEUE) -> tuple[dict[str, Any], Any]:
    """Take one message off `queue`: (headers, decoded body)."""
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue)
        try:
            message = simple.get(timeout=10)
            message.ack()
            return message.headers, message.decode()
        finally:
            simple.close()


def test_dispatch_sends_the_task_by_name_with_references_only(tmp_path: Path, redis: Redis) -> None:
    app = make_celery(Settings(storage_dir=tmp_path, broker_url=f"redis://127.0.0.1:{redis.port}/0"))

    task_id = dispatch_analysis(app, "1.2.3", INSTANCES)

    headers, (args, kwargs, _) = next_message(app)
    assert headers["task"] == ANALYSE_STUDY
    assert headers["id"] == task_id
    # The options say which result objects to write: all four when no destination is set.
    assert args == ["1.2.3", INSTANCES, {"objects": ["SR", "SEG", "GSPS", "SC"], "sc_heatmap": False, "heartbeat_seconds": 5.0}]
    assert kwargs == {}


def test_a_study_waits_for_the_broker_and_is_then_dispatched_once(tmp_path: Path) -> None:
    port = dicom_peers.free_port()
    app = make_celery(Settings(storage_dir=tmp_path, broker_url=f"redis://127.0.0.1:{port}/0"))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    loop = SettleLoop(ledger, make_dispatcher(app), settle_seconds=0)
    ledger.record_instance(
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_instance_uid="1.2.3.9",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        storage_key=INSTANCES[0]["key"],
    )

    assert loop.run_once(utcnow() + timedelta(seconds=1)) == []  # broker down
    assert ledger.study_status("1.2.3")["status"] == "receiving"

    redis = Redis(tmp_path / "redis", port)
    try:
        assert loop.run_once(utcnow() + timedelta(seconds=1)) == ["1.2.3"]
        assert loop.run_once(utcnow() + timedelta(seconds=2)) == []
        headers, (args, _, _) = next_message(app)
        assert args[:2] == ["1.2.3", [{**INSTANCES[0], "series_instance_uid": "1.2.3.9", "sop_class_uid": CR}]]
        study = ledger.study_status("1.2.3")
        assert (study["status"], study["task_id"]) == ("queued", headers["id"])
    finally:
        redis.stop()
        ledger.close()


def test_dispatch_through_the_embedded_broker(tmp_path: Path) -> None:
    app = make_celery(Settings(storage_dir=tmp_path))

    task_id = dispatch_analysis(app, "1.2.3", INSTANCES)

    headers, (args, _, _) = next_message(app)
    assert (headers["task"], headers["id"], args[:2]) == (ANALYSE_STUDY, task_id, ["1.2.3", INSTANCES])
    assert (tmp_path / "broker.sqlite").is_file()


def test_analysis_options_ask_for_what_the_destinations_receive(tmp_path: Path) -> None:
    settings = Settings(
        storage_dir=tmp_path,
        sc_heatmap=True,
        destinations=[
            Destination(ae_title="PACS", host="127.0.0.1", port=104, objects=["SEG", "GSPS"]),
            Destination(ae_title="VIEWER", host="127.0.0.1", port=105, objects=["SC"]),
        ],
    )
    # The SR is always written: it is the record of the analysis.
    assert analysis_options(settings) == {
        "objects": ["SR", "SEG", "GSPS", "SC"], "sc_heatmap": True, "heartbeat_seconds": 5.0,
    }
    only_sr = Settings(storage_dir=tmp_path, destinations=[Destination(ae_title="RIS", host="h", port=1, objects=["SR"])])
    assert analysis_options(only_sr) == {"objects": ["SR"], "sc_heatmap": False, "heartbeat_seconds": 5.0}


@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_a_study_waiting_in_the_broker_is_not_dispatched_again_however_long_no_worker_runs(
    tmp_path: Path, broker: str, request: pytest.FixtureRequest
) -> None:
    """No worker for many timeouts: the study's one task waits in the broker and is not sent again
    (it used to be, each timeout, and analysed as many times once a worker came); once the task is
    gone from the broker (lost) and never started, it is sent again once."""
    from node.dispatch import analysis_tasks_waiting

    if broker == "redis":
        server = request.getfixturevalue("redis")
        app = make_celery(Settings(storage_dir=tmp_path, broker_url=f"redis://127.0.0.1:{server.port}/0"))
    else:
        app = make_celery(Settings(storage_dir=tmp_path))
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    t0 = utcnow()
    ledger.record_instance(
        sop_instance_uid="1.2.3.4", study_uid="1.2.3", series_instance_uid="1.2.3.9", sop_class_uid=CR,
        transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=INSTANCES[0]["key"], received_at=t0,
    )
    loop = SettleLoop(ledger, make_dispatcher(app), settle_seconds=1, analysis_timeout_seconds=60,
                      tasks_waiting=lambda: analysis_tasks_waiting(app))
    assert loop.run_once(now=t0 + timedelta(seconds=2)) == ["1.2.3"]
    for minutes in (2, 5, 10):  # ten timeouts without a worker
        assert loop.run_once(now=t0 + timedelta(minutes=minutes)) == []
    assert ledger.study_status("1.2.3")["status"] == "queued"

    headers, _ = next_message(app)  # the one task; taken off the queue, as a broker that lost it
    assert headers["task"] == ANALYSE_STUDY
    assert not analysis_tasks_waiting(app)
    assert loop.run_once(now=t0 + timedelta(minutes=12)) == ["1.2.3"]  # lost and never started: sent again
    assert loop.run_once(now=t0 + timedelta(minutes=20)) == []  # and that one waits in turn
    next_message(app)
    assert analysis_tasks_waiting(app) is False
    ledger.close()


def test_a_started_analysis_without_a_result_is_dispatched_again_after_the_timeout(tmp_path: Path) -> None:
    """A worker took the task and died: its message may still be unacknowledged in the broker, but
    the analysis started, so the timeout alone decides."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    t0 = utcnow()
    ledger.record_instance(
        sop_instance_uid="1.2.3.4", study_uid="1.2.3", series_instance_uid="1.2.3.9", sop_class_uid=CR,
        transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=INSTANCES[0]["key"], received_at=t0,
    )
    ledger.mark_queued("1.2.3", ["1.2.3.4"], task_id="t1", now=t0 + timedelta(seconds=2))
    ledger.mark_analysing("1.2.3", "t1", now=t0 + timedelta(seconds=3))
    asked = []
    waiting = lambda: asked.append(1) or True  # noqa: E731  (the broker would say it holds tasks)
    assert ledger.requeue_stale(60, now=t0 + timedelta(minutes=5), tasks_waiting=waiting) == ["1.2.3"]
    assert asked == []  # the broker is asked only about studies whose task never started
    ledger.close()


def test_the_embedded_broker_polls_at_the_configured_interval(tmp_path: Path) -> None:
    app = make_celery(Settings(storage_dir=tmp_path, broker_polling_ms=20))
    with app.connection_for_write() as connection:
        assert connection.transport.polling_interval == 0.02

    task_id = dispatch_analysis(app, "1.2.3", INSTANCES)  # a round trip through the SQLite file
    headers, _ = next_message(app)
    assert headers["id"] == task_id


def test_the_export_worker_app_polls_at_the_configured_interval(tmp_path: Path) -> None:
    """The node starts its export worker on node/celery_entry.py's app: the setting reaches it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    env.update(PLEURA_STORAGE_DIR=str(tmp_path), PLEURA_BROKER_POLLING_MS="30")
    shown = subprocess.run(
        [sys.executable, "-c", "from node.celery_entry import app\n"
         "with app.connection_for_write() as c: print(c.transport.polling_interval)"],
        capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().splitlines()[-1] == "0.03"
