"""Analysis leases (node/ledger/leases.py): a running analysis whose heartbeats stop is taken back
and dispatched again; a study that keeps killing its worker is reported as not analysed.

The rules on a real ledger and the embedded broker; the real processes (a worker killed with
SIGKILL) are in tests/test_faults.py.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from celery import Celery

from config.settings import Settings
from contract.tasks import ANALYSE_STUDY, RADIOGRAPH_QUEUE
from node.dispatch import make_dispatcher
from node.ledger import Ledger, utcnow
from node.ledger.leases import CRASHED_REASON, LOST_REASON
from node.settle import SettleLoop
from test_node_dispatch import CR, INSTANCES, next_message
from contract.celery_app import make_celery

STUDY, SOP = "1.2.3", "1.2.3.4"
LEASE = 20.0


def ledger_with_a_study(tmp_path: Path) -> tuple[Ledger, object]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    t0 = utcnow()
    ledger.record_instance(
        sop_instance_uid=SOP, study_uid=STUDY, series_instance_uid="1.2.3.9", sop_class_uid=CR,
        transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=INSTANCES[0]["key"], received_at=t0,
    )
    return ledger, t0


def status(ledger: Ledger) -> tuple[str, str]:
    return ledger.study_status(STUDY)["status"], ledger.list_instances(STUDY)[0].analysis_status


def test_a_running_analysis_holds_its_study_while_it_beats_and_loses_it_when_it_stops(tmp_path: Path) -> None:
    ledger, t0 = ledger_with_a_study(tmp_path)
    ledger.mark_queued(STUDY, [SOP], task_id="t1")
    # Queued but never started: not leased (the queue's timeout decides, Ledger.requeue_stale).
    assert ledger.reclaim_lapsed(LEASE, now=utcnow() + timedelta(hours=2)) == []
    ledger.mark_analysing(STUDY, "t1")
    now = utcnow()
    assert ledger.reclaim_lapsed(LEASE, now=now + timedelta(seconds=LEASE - 5)) == []
    ledger.record_heartbeat(STUDY, "t1", now=now + timedelta(seconds=15))
    assert ledger.reclaim_lapsed(LEASE, now=now + timedelta(seconds=LEASE + 10)) == []  # beat 15 s ago
    # The heartbeats stop: while the export queue (which carries them) holds messages, the study
    # is not taken; once it is empty, it is.
    later = now + timedelta(seconds=15 + LEASE + 1)
    assert ledger.reclaim_lapsed(LEASE, now=later, export_waiting=lambda: True) == []
    [lapsed] = ledger.reclaim_lapsed(LEASE, now=later, export_waiting=lambda: False)
    assert (lapsed.study_uid, lapsed.lapses, lapsed.task_id) == (STUDY, 1, "t1")
    assert status(ledger) == ("receiving", "pending")  # due again
    assert ledger.analysis_lapses(STUDY) == 1 and ledger.lapse_options(STUDY) == {}
    # Taken once: the lapse is not counted again before the study's next start.
    ledger.mark_queued(STUDY, [SOP], task_id="t2")
    assert ledger.reclaim_lapsed(LEASE, now=later + timedelta(minutes=5)) == []
    ledger.close()


def test_a_recorded_analysis_forgives_the_lapses(tmp_path: Path) -> None:
    ledger, _ = ledger_with_a_study(tmp_path)
    ledger.mark_queued(STUDY, [SOP], task_id="t1")
    ledger.mark_analysing(STUDY, "t1")
    assert len(ledger.reclaim_lapsed(LEASE, now=utcnow() + timedelta(minutes=1))) == 1
    ledger.mark_queued(STUDY, [SOP], task_id="t2")
    ledger.mark_analysing(STUDY, "t2")
    ledger.record_analysis({
        "study_uid": STUDY, "model": {"name": "m", "version": "1"}, "flagged": False, "results": [],
        "images": [{"sop_instance_uid": SOP, "status": "analysed", "probability": 0.1, "flagged": False}],
    })
    assert ledger.analysis_lapses(STUDY) == 0
    assert ledger.reclaim_lapsed(LEASE, now=utcnow() + timedelta(minutes=5)) == []  # analysed: nothing queued
    ledger.close()


def test_a_study_that_kills_its_worker_twice_is_reported_not_analysed(tmp_path: Path) -> None:
    """Through the settle loop and the embedded broker: the first lapse dispatches the study as
    before, the second with the reason its "not analysed" report gives; if that worker is lost
    too, the ledger marks the study not analysed, with the reason, and dispatches it no more."""
    settings = Settings(storage_dir=tmp_path / "storage")
    app: Celery = make_celery(settings)
    ledger, t0 = ledger_with_a_study(tmp_path)
    loop = SettleLoop(ledger, make_dispatcher(app), settle_seconds=1, lease_seconds=LEASE,
                      export_waiting=lambda: False, revoke=lambda task_id: None)
    options_sent = []
    now = utcnow() + timedelta(seconds=2)
    assert loop.run_once(now=now) == [STUDY]  # settled: the first dispatch
    for lapse in (1, 2, 3):
        headers, body = next_message(app, RADIOGRAPH_QUEUE)
        assert headers["task"] == ANALYSE_STUDY
        options_sent.append(body[0][2])
        ledger.mark_analysing(STUDY, headers["id"])  # a worker takes it, and is killed: no heartbeat
        now = utcnow() + timedelta(seconds=LEASE + 1)
        # The lapse is taken back and, but for the third, dispatched again in the same round.
        assert loop.run_once(now=now) == ([STUDY] if lapse < 3 else [])
        assert ledger.analysis_lapses(STUDY) == lapse
    assert [o.get("not_analysed_reason") for o in options_sent] == [None, None, CRASHED_REASON]
    assert options_sent[0]["heartbeat_seconds"] == settings.analysis_lease_seconds / 4
    assert status(ledger) == ("not_analysed", "not_analysed")
    assert ledger.list_instances(STUDY)[0].analysis_reason == LOST_REASON
    assert loop.run_once(now=now + timedelta(minutes=10)) == []
    ledger.close()
