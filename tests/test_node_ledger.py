"""The ledger's rules, on a real SQLite file: duplicates, settling, analysis, outbox and backoff."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from node.ledger import Ledger, LedgerError
from services import PostgresCluster

T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=timezone.utc)
STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    else:
        url = request.getfixturevalue("postgres").new_database_url()
    ledger = Ledger(url)
    yield ledger
    ledger.close()


def record(ledger: Ledger, sop: str, at: datetime, study: str = STUDY) -> bool:
    return ledger.record_instance(
        sop_instance_uid=sop,
        study_uid=study,
        series_instance_uid=SERIES,
        sop_class_uid=CR,
        transfer_syntax_uid=EXPLICIT,
        storage_key=f"instances/{study}/{SERIES}/{sop}.dcm",
        calling_ae="MODALITY",
        patient_id="PID-1",
        accession_number="ACC-1",
        received_at=at,
    )


def summary(images: list[dict[str, Any]], results: list[dict[str, Any]], study: str = STUDY) -> dict[str, Any]:
    return {
        "study_uid": study,
        "model": {"name": "pleura-cxr", "version": "1.0.0", "synthetic_demo": True},
        "images": images,
        "results": results,
        "flagged": any(image.get("flagged") for image in images),
        "analysed_at": (T0 + timedelta(minutes=1)).isoformat(),
    }


def analysed(sop: str, probability: float, flagged: bool) -> dict[str, Any]:
    return {
        "sop_instance_uid": sop,
        "status": "analysed",
        "reason": None,
        "probability": probability,
        "flagged": flagged,
        "area_px": 1200 if flagged else 0,
        "area_cm2": 3.5 if flagged else 0.0,
    }


def result(kind: str, uid: str, source: str | None) -> dict[str, Any]:
    return {
        "kind": kind,
        "key": f"results/{STUDY}/{uid}.dcm",
        "sop_instance_uid": uid,
        "sop_class_uid": SEG_CLASS if kind == "SEG" else SR_CLASS,
        "source_sop_instance_uid": source,
    }


def test_a_resent_instance_is_recorded_once(ledger: Ledger) -> None:
    assert record(ledger, "1.2.3.1", T0) is True
    assert record(ledger, "1.2.3.1", T0 + timedelta(seconds=30)) is False

    assert [i.sop_instance_uid for i in ledger.list_instances(STUDY)] == ["1.2.3.1"]
    study = ledger.study_status(STUDY)
    assert study is not None
    assert (study["status"], study["instances"], study["patient_id"], study["accession_number"]) == (
        "receiving",
        1,
        "PID-1",
        "ACC-1",
    )
    # The duplicate did not move the settle clock.
    assert study["last_received_at"] == T0
    assert study["first_received_at"].tzinfo is not None


def test_due_studies_waits_for_the_quiet_time(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    record(ledger, "1.2.3.2", T0 + timedelta(seconds=4))

    assert ledger.due_studies(5, T0 + timedelta(seconds=8.9)) == []
    due = ledger.due_studies(5, T0 + timedelta(seconds=9))
    assert [d.study_uid for d in due] == [STUDY]
    assert due[0].instances == [
        {"sop_instance_uid": "1.2.3.1", "key": f"instances/{STUDY}/{SERIES}/1.2.3.1.dcm", "series_instance_uid": SERIES, "sop_class_uid": CR},
        {"sop_instance_uid": "1.2.3.2", "key": f"instances/{STUDY}/{SERIES}/1.2.3.2.dcm", "series_instance_uid": SERIES, "sop_class_uid": CR},
    ]

    ledger.mark_queued(STUDY, ["1.2.3.1", "1.2.3.2"], task_id="task-1", now=T0 + timedelta(seconds=9))
    assert ledger.due_studies(5, T0 + timedelta(hours=1)) == []
    record(ledger, "7.7.7.1", T0 + timedelta(minutes=1), study="7.7.7")
    assert [(s["study_uid"], s["status"], s["instances"]) for s in ledger.list_studies()] == [
        ("7.7.7", "receiving", 1),
        (STUDY, "queued", 2),
    ]
    assert [s["study_uid"] for s in ledger.list_studies(status="queued")] == [STUDY]
    study = ledger.study_status(STUDY)
    assert study is not None and (study["status"], study["task_id"]) == ("queued", "task-1")


def test_an_instance_arriving_during_dispatch_is_sent_in_a_later_round(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    due = ledger.due_studies(5, T0 + timedelta(seconds=5))
    record(ledger, "1.2.3.2", T0 + timedelta(seconds=5.5))  # arrives before mark_queued
    ledger.mark_queued(STUDY, [i["sop_instance_uid"] for i in due[0].instances], task_id="t1")

    assert ledger.study_status(STUDY)["status"] == "receiving"
    assert ledger.due_studies(5, T0 + timedelta(seconds=10)) == []
    later = ledger.due_studies(5, T0 + timedelta(seconds=10.5))
    assert [i["sop_instance_uid"] for i in later[0].instances] == ["1.2.3.2"]


def test_record_analysis_sets_the_study_outcome_and_is_idempotent(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    record(ledger, "1.2.3.2", T0)
    ledger.mark_queued(STUDY, task_id="t1")
    images = [
        analysed("1.2.3.1", 0.91, True),
        {
            "sop_instance_uid": "1.2.3.2",
            "status": "not_analysed",
            "reason": "lateral view",
            "probability": None,
            "flagged": None,
            "area_px": None,
            "area_cm2": None,
        },
    ]
    results = [result("SEG", "2.25.1", "1.2.3.1"), result("SR", "2.25.2", "1.2.3.1")]

    assert ledger.record_analysis(summary(images, results)) == ["2.25.1", "2.25.2"]
    assert ledger.record_analysis(summary(images, results)) == ["2.25.1", "2.25.2"]

    study = ledger.study_status(STUDY)
    assert study["status"] == "done"
    assert study["flagged"] is True and study["probability"] == pytest.approx(0.91)
    assert (study["area_px"], study["area_cm2"]) == (1200, 3.5)
    assert (study["model_name"], study["model_version"], study["synthetic_model"]) == ("pleura-cxr", "1.0.0", True)
    assert study["analysed_at"] == T0 + timedelta(minutes=1)
    assert "1 of 2 images analysed" in study["reason"] and "lateral view" in study["reason"]
    assert [r.sop_instance_uid for r in ledger.list_results(STUDY)] == ["2.25.1", "2.25.2"]
    by_uid = {i.sop_instance_uid: i for i in ledger.list_instances(STUDY)}
    assert by_uid["1.2.3.1"].analysis_status == "analysed" and by_uid["1.2.3.1"].area_cm2 == 3.5
    assert (by_uid["1.2.3.2"].analysis_status, by_uid["1.2.3.2"].analysis_reason) == ("not_analysed", "lateral view")


def test_a_study_with_no_eligible_image_is_not_analysed_with_the_reason(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    ledger.mark_queued(STUDY)
    ledger.record_analysis(
        summary([{"sop_instance_uid": "1.2.3.1", "status": "not_analysed", "reason": "not a chest radiograph"}], [])
    )
    study = ledger.study_status(STUDY)
    assert (study["status"], study["reason"], study["flagged"]) == ("not_analysed", "not a chest radiograph", None)


def test_a_new_instance_reopens_an_analysed_study(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    ledger.mark_queued(STUDY)
    ledger.record_analysis(summary([analysed("1.2.3.1", 0.1, False)], []))
    assert ledger.study_status(STUDY)["status"] == "done"

    assert record(ledger, "1.2.3.1", T0 + timedelta(minutes=5)) is False  # re-sent: no new work
    assert ledger.study_status(STUDY)["status"] == "done"

    assert record(ledger, "1.2.3.9", T0 + timedelta(minutes=5)) is True
    assert ledger.study_status(STUDY)["status"] == "receiving"
    due = ledger.due_studies(5, T0 + timedelta(minutes=6))
    assert [i["sop_instance_uid"] for i in due[0].instances] == ["1.2.3.9"]


def test_summary_errors_name_the_field(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="no 'study_uid'"):
        ledger.record_analysis({"model": {}, "images": [], "results": []})
    bad = summary([{"sop_instance_uid": "1.2.3.1", "status": "maybe"}], [])
    with pytest.raises(ValueError, match=r"images\[0\]\.status 'maybe'"):
        ledger.record_analysis(bad)
    with pytest.raises(LedgerError, match="does not know"):
        ledger.record_analysis(summary([], [], study="9.9.9"))


def _analysed_study_with_results(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    ledger.mark_queued(STUDY)
    ledger.record_analysis(
        summary(
            [analysed("1.2.3.1", 0.9, True)], [result("SEG", "2.25.1", "1.2.3.1"), result("SR", "2.25.2", "1.2.3.1")]
        )
    )


def test_outbox_rows_are_created_once_and_the_study_is_delivered_when_all_are_sent(ledger: Ledger) -> None:
    _analysed_study_with_results(ledger)
    destinations = ["PACS@127.0.0.1:104", "ARCHIVE@127.0.0.1:105"]

    ids = ledger.create_outbox(STUDY, destinations, now=T0)
    assert len(ids) == 4
    assert ledger.create_outbox(STUDY, destinations, now=T0) == ids  # redelivered: nothing new
    assert len(ledger.list_outbox(STUDY)) == 4

    for outbox_id in ids[:-1]:
        assert ledger.claim_outbox(outbox_id, now=T0) is not None
        ledger.record_delivery_success(outbox_id, now=T0 + timedelta(seconds=1))
        assert ledger.claim_outbox(outbox_id, now=T0 + timedelta(hours=1)) is None  # sent: nothing to do
    assert ledger.study_status(STUDY)["status"] == "done"

    ledger.record_delivery_success(ids[-1], now=T0 + timedelta(seconds=2))
    study = ledger.study_status(STUDY)
    assert (study["status"], study["delivered_at"]) == ("delivered", T0 + timedelta(seconds=2))
    assert ledger.create_outbox(STUDY, destinations) == []  # nothing pending any more

    # The same summary delivered again leaves the study delivered.
    ledger.record_analysis(
        summary(
            [analysed("1.2.3.1", 0.9, True)], [result("SEG", "2.25.1", "1.2.3.1"), result("SR", "2.25.2", "1.2.3.1")]
        )
    )
    assert ledger.study_status(STUDY)["status"] == "delivered"


def test_failed_deliveries_back_off_then_fail_with_the_reason(ledger: Ledger) -> None:
    _analysed_study_with_results(ledger)
    outbox_id = ledger.create_outbox(STUDY, ["PACS@127.0.0.1:104"], now=T0)[0]

    now = T0
    delays = []
    for attempt in range(1, 4):
        assert ledger.claim_outbox(outbox_id, now=now) is not None
        # While an attempt runs, a duplicate message cannot claim the row.
        assert ledger.claim_outbox(outbox_id, now=now) is None
        view = ledger.record_delivery_failure(
            outbox_id, "connection refused", retry_seconds=10, max_attempts=4, now=now
        )
        assert (view.status, view.attempts) == ("pending", attempt)
        delays.append((view.next_attempt_at - now).total_seconds())
        assert ledger.claim_outbox(outbox_id, now=now + timedelta(seconds=delays[-1] - 5)) is None  # not yet due
        now = view.next_attempt_at
    assert delays == [10, 20, 40]

    assert ledger.claim_outbox(outbox_id, now=now) is not None
    view = ledger.record_delivery_failure(outbox_id, "connection refused", retry_seconds=10, max_attempts=4, now=now)
    assert (view.status, view.attempts, view.next_attempt_at, view.last_error) == (
        "failed",
        4,
        None,
        "connection refused",
    )
    study = ledger.study_status(STUDY)
    assert study["status"] == "done"
    assert "PACS@127.0.0.1:104 failed after 4 attempts: connection refused" in study["reason"]


def test_a_study_whose_deliveries_are_settled_with_a_failure_is_delivery_failed(ledger: Ledger) -> None:
    _analysed_study_with_results(ledger)
    seg_row, sr_row = ledger.create_outbox(STUDY, ["PACS@127.0.0.1:104"], now=T0)
    ledger.record_delivery_success(seg_row, now=T0)
    ledger.record_delivery_failure(sr_row, "refused: unknown calling AE", retry_seconds=10, max_attempts=1, now=T0)
    study = ledger.study_status(STUDY)
    assert study["status"] == "delivery_failed"
    assert "unknown calling AE" in study["reason"]
    assert [s["study_uid"] for s in ledger.list_studies(status="delivery_failed")] == [STUDY]


def test_a_result_back_before_the_study_is_marked_queued_still_finishes_it(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    due = ledger.due_studies(5, T0 + timedelta(seconds=10))
    assert [d.study_uid for d in due] == [STUDY]
    # A fast worker: the summary is recorded before the dispatcher marks the study queued.
    ledger.record_analysis(summary([analysed("1.2.3.1", 0.2, False)], [result("SR", "2.25.9", "1.2.3.1")]))
    ledger.mark_queued(STUDY, ["1.2.3.1"], task_id="t1", now=T0 + timedelta(seconds=10))
    assert ledger.study_status(STUDY)["status"] == "done"
    assert ledger.due_studies(5, T0 + timedelta(minutes=5)) == []


def test_a_study_queued_too_long_is_put_back_for_dispatch(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    ledger.mark_queued(STUDY, now=T0 + timedelta(seconds=10))
    assert ledger.requeue_stale(3600, now=T0 + timedelta(minutes=30)) == []
    assert ledger.study_status(STUDY)["status"] == "queued"

    assert ledger.requeue_stale(3600, now=T0 + timedelta(hours=2)) == [STUDY]
    due = ledger.due_studies(5, T0 + timedelta(hours=2))
    assert [(d.study_uid, [i["sop_instance_uid"] for i in d.instances]) for d in due] == [(STUDY, ["1.2.3.1"])]
    # An analysed study is never put back.
    ledger.mark_queued(STUDY, now=T0 + timedelta(hours=2))
    ledger.record_analysis(summary([analysed("1.2.3.1", 0.2, False)], []))
    assert ledger.requeue_stale(3600, now=T0 + timedelta(days=2)) == []


def test_overdue_rows_are_requeued_once_per_margin(ledger: Ledger) -> None:
    _analysed_study_with_results(ledger)
    ids = ledger.create_outbox(STUDY, ["PACS@127.0.0.1:104"], now=T0)

    assert ledger.requeue_overdue_outbox(60, now=T0 + timedelta(seconds=30)) == []
    assert ledger.requeue_overdue_outbox(60, now=T0 + timedelta(seconds=61)) == ids
    assert ledger.requeue_overdue_outbox(60, now=T0 + timedelta(seconds=62)) == []
    assert ledger.requeue_overdue_outbox(60, now=T0 + timedelta(seconds=122)) == ids


def test_concurrent_receivers_record_each_instance_once(ledger: Ledger) -> None:
    sops = [f"1.2.3.{n}" for n in range(1, 21)]
    created: list[bool] = []
    lock = threading.Lock()

    def receive() -> None:
        for sop in sops:
            outcome = record(ledger, sop, T0)
            with lock:
                created.append(outcome)

    threads = [threading.Thread(target=receive) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert created.count(True) == len(sops)
    assert len(ledger.list_instances(STUDY)) == len(sops)


def test_a_ledger_in_a_missing_folder_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="PLEURA_DATABASE_URL"):
        Ledger(f"sqlite:///{tmp_path / 'missing' / 'ledger.sqlite'}")


def test_each_destination_gets_only_the_kinds_it_receives(ledger: Ledger) -> None:
    record(ledger, "1.2.3.1", T0)
    ledger.mark_queued(STUDY)
    image = analysed("1.2.3.1", 0.9, True) | {"side": "left", "gap_mm": 31.5, "hemithorax_fraction": 0.21}
    ledger.record_analysis(
        summary(
            [image],
            [result("SEG", "2.25.1", "1.2.3.1"), result("SR", "2.25.2", None), result("GSPS", "2.25.3", "1.2.3.1"),
             result("SC", "2.25.4", "1.2.3.1")],
        )
    )
    [instance] = ledger.list_instances(STUDY)
    assert (instance.side, instance.gap_mm, instance.hemithorax_fraction) == ("left", 31.5, 0.21)

    ids = ledger.create_outbox(STUDY, {"PACS@127.0.0.1:104": ["SR", "SEG"], "VIEWER@127.0.0.1:105": ["SC"]}, now=T0)
    rows = {(row.destination, row.result_kind) for row in ledger.list_outbox(STUDY)}
    assert rows == {("PACS@127.0.0.1:104", "SR"), ("PACS@127.0.0.1:104", "SEG"), ("VIEWER@127.0.0.1:105", "SC")}
    # The GSPS no destination receives does not keep the study from being delivered.
    for outbox_id in ids:
        assert ledger.claim_outbox(outbox_id, now=T0) is not None
        ledger.record_delivery_success(outbox_id, now=T0)
    assert ledger.study_status(STUDY)["status"] == "delivered"


def test_processes_opening_a_new_postgresql_ledger_at_once_all_succeed(postgres: PostgresCluster) -> None:
    """The node and its export worker start together on a fresh database (a compose stack): the
    tables must be created once, not raced into a duplicate-key error."""
    import multiprocessing
    import time

    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        pool.map(_open_ledger, [(postgres.new_database_url(), 0.0)] * 4)  # imports done: start together below
        for _ in range(5):
            url = postgres.new_database_url()
            start = time.time() + 0.5
            outcomes = pool.map(_open_ledger, [(url, start)] * 4, chunksize=1)
            assert outcomes == ["ok"] * 4
        ledger = Ledger(url)
        assert ledger.record_instance is not None
        ledger.close()


def _open_ledger(job: tuple[str, float]) -> str:
    import time

    url, start = job
    time.sleep(max(0.0, start - time.time()))
    try:
        Ledger(url).close()
    except LedgerError as exc:
        return str(exc)
    return "ok"


def test_deliveries_of_one_study_finished_at_once_leave_it_delivered(ledger: Ledger) -> None:
    """The export worker delivers a study's SEG and SR in two threads; whichever commits last must
    see the other's delivery and mark the study delivered (on PostgreSQL too, where both
    transactions run at once)."""
    _analysed_study_with_results(ledger)
    destinations = [f"PACS{n}@127.0.0.1:104" for n in range(4)]
    ids = ledger.create_outbox(STUDY, destinations, now=T0)
    assert len(ids) == 8
    barrier = threading.Barrier(len(ids))

    def deliver(outbox_id: int) -> None:
        barrier.wait()
        ledger.record_delivery_success(outbox_id, now=T0 + timedelta(seconds=1))

    threads = [threading.Thread(target=deliver, args=(outbox_id,)) for outbox_id in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(row.status == "sent" for row in ledger.list_outbox(STUDY))
    assert ledger.study_status(STUDY)["status"] == "delivered"


def test_reads_do_not_wait_for_a_writer_holding_the_sqlite_lock(tmp_path: Path) -> None:
    """The worklist, the API and the dispatcher only read: on SQLite they read a snapshot while
    another process holds the write lock (the SCP recording an instance), instead of queueing
    behind it, and they see what was committed before it."""
    import sqlite3

    path = tmp_path / "ledger.db"
    ledger = Ledger(f"sqlite:///{path}")
    now = datetime.now(timezone.utc)
    record(ledger, "1.2.3.1", now - timedelta(seconds=30))
    writer = sqlite3.connect(path, isolation_level=None, timeout=0.1)
    writer.execute("BEGIN IMMEDIATE")  # another process's write transaction, not committed yet
    writer.execute("UPDATE studies SET status = 'analysing'")
    outcome: dict[str, Any] = {}

    def read() -> None:
        try:
            outcome["instances"] = [i.sop_instance_uid for i in ledger.list_instances(STUDY)]
            outcome["known"] = ledger.has_instance("1.2.3.1")
            outcome["due"] = [s.study_uid for s in ledger.due_studies(settle_seconds=5)]
            outcome["studies"] = [s["status"] for s in ledger.list_studies()]
        except Exception as exc:  # the test's verdict below names it
            outcome["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(timeout=5)  # a locked read would wait the 30 s busy timeout
    try:
        assert not reader.is_alive(), "the reads waited for the write lock"
        assert "error" not in outcome, outcome.get("error")
        assert outcome == {"instances": ["1.2.3.1"], "known": True, "due": [STUDY], "studies": ["receiving"]}
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        reader.join()
        ledger.close()


def test_a_reanalysed_study_is_dispatched_again_and_delivered_again_with_its_history(ledger: Ledger) -> None:
    _analysed_study_with_results(ledger)
    destinations = ["PACS@127.0.0.1:104"]
    for outbox_id in ledger.create_outbox(STUDY, destinations, now=T0):
        ledger.claim_outbox(outbox_id, now=T0)
        ledger.record_delivery_success(outbox_id, now=T0)
    assert ledger.study_status(STUDY)["status"] == "delivered"
    # Before the request, a delivered study is due for nothing.
    assert ledger.due_studies(0, T0 + timedelta(hours=1)) == []
    assert ledger.reanalysis_options(STUDY) == {}

    assert ledger.reanalysis_candidates(model_version="pleura-cxr/1.0.0") == [STUDY]
    assert ledger.reanalysis_candidates(model_version="2.0.0") == []
    assert ledger.request_reanalysis([STUDY], now=T0 + timedelta(hours=1)) == [STUDY]
    [due] = ledger.due_studies(0, T0 + timedelta(hours=1))
    assert [i["sop_instance_uid"] for i in due.instances] == ["1.2.3.1"]
    supersedes = ledger.reanalysis_options(STUDY)["supersedes"]
    assert (supersedes["sop_instance_uid"], supersedes["model_version"]) == ("2.25.2", "1.0.0")
    ledger.mark_queued(STUDY)
    assert ledger.request_reanalysis([STUDY]) == []  # on its way already: left alone

    # The same model again: the same result UIDs, delivered again all the same.
    again = summary(
        [analysed("1.2.3.1", 0.2, False)], [result("SR", "2.25.2", "1.2.3.1")]
    )
    again["analysed_at"] = (T0 + timedelta(hours=2)).isoformat()
    ledger.record_analysis(again)
    pending = ledger.create_outbox(STUDY, destinations, now=T0 + timedelta(hours=2))
    assert [ledger.outbox_entry(i).result_uid for i in pending] == ["2.25.2"]
    assert ledger.study_status(STUDY)["status"] == "done"
    assert ledger.reanalysis_options(STUDY) == {}  # answered

    history = ledger.list_analyses(STUDY)
    assert [(h.flagged, h.reanalysis, h.sr_sop_instance_uid) for h in history] == [
        (False, True, "2.25.2"),
        (True, False, "2.25.2"),
    ]
    ledger.record_analysis(again)  # the same summary twice: one analysis
    assert len(ledger.list_analyses(STUDY)) == 2
