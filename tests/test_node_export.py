"""Export: the Storage SCU against DCMTK's storescp, the outbox's retries, and the node tasks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydicom
import pytest
from celery.exceptions import Retry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicom_peers
from config.destinations import Destination
from config.settings import Settings
from node.dispatch import queue_depths
from node.export import DeliveryError, deliver_outbox_entry, send_results
from node.ledger import Ledger
from node.storage import InstanceStore
from node.tasks import register_node_tasks
from contract.tasks import DELIVER_RESULT, RECORD_ANALYSIS
from contract.celery_app import make_celery

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY = "1.2.826.0.1.3680043.8.498.500"
SOURCE = "1.2.826.0.1.3680043.8.498.502"
T0 = datetime(2025, 3, 1, 8, 0, 0, tzinfo=timezone.utc)


def result_dataset(sop_class: str, modality: str) -> Dataset:
    """A small result object of the given SOP class (the transport does not look inside)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "TEST-1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_result(storage: Path, kind: str) -> dict[str, Any]:
    """Write a SEG or SR result under `storage`; returns its entry for a worker summary."""
    sop_class, modality = (SEG_CLASS, "SEG") if kind == "SEG" else (COMPREHENSIVE_3D_SR, "SR")
    ds = result_dataset(sop_class, modality)
    key = f"results/{STUDY}/{ds.SOPInstanceUID}.dcm"
    (storage / key).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(storage / key, enforce_file_format=True)
    return {
        "kind": kind,
        "key": key,
        "sop_instance_uid": ds.SOPInstanceUID,
        "sop_class_uid": sop_class,
        "source_sop_instance_uid": SOURCE,
    }


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "study_uid": STUDY,
        "model": {"name": "pleura-cxr", "version": "1.0.0", "synthetic_demo": True},
        "images": [
            {
                "sop_instance_uid": SOURCE,
                "status": "analysed",
                "reason": None,
                "probability": 0.93,
                "flagged": True,
                "area_px": 5000,
                "area_cm2": 12.5,
            }
        ],
        "results": results,
        "flagged": True,
        "analysed_at": T0.isoformat(),
    }


def received_uids(pacs: dicom_peers.StoreSCP) -> set[str]:
    return {pydicom.dcmread(path).SOPInstanceUID for path in pacs.received()}


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[dicom_peers.StoreSCP]:
    with dicom_peers.StoreSCP(tmp_path / "pacs", ae_title="PACS") as peer:
        yield peer


@pytest.fixture()
def storage(tmp_path: Path) -> Path:
    folder = tmp_path / "storage"
    folder.mkdir()
    return folder


def analysed_study(ledger: Ledger, storage: Path) -> list[dict[str, Any]]:
    """A study in the ledger whose analysis produced a SEG and an SR."""
    ledger.record_instance(
        sop_instance_uid=SOURCE,
        study_uid=STUDY,
        series_instance_uid="1.2.826.0.1.3680043.8.498.501",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        storage_key=f"instances/{STUDY}/x/{SOURCE}.dcm",
        received_at=T0,
    )
    ledger.mark_queued(STUDY, task_id="analyse-1", now=T0)
    return [write_result(storage, "SEG"), write_result(storage, "SR")]


def test_send_results_stores_seg_and_sr_at_a_real_peer(pacs: dicom_peers.StoreSCP, storage: Path) -> None:
    results = [write_result(storage, "SEG"), write_result(storage, "SR")]
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port)

    statuses = send_results(destination, "PLEURA", [storage / r["key"] for r in results])

    assert statuses == [0x0000, 0x0000]
    dicom_peers.wait_for(lambda: len(pacs.received()) == 2, 10, "storescp to write both files")
    assert received_uids(pacs) == {r["sop_instance_uid"] for r in results}
    kept = {pydicom.dcmread(p).SOPClassUID for p in pacs.received()}
    assert kept == {SEG_CLASS, COMPREHENSIVE_3D_SR}


def test_send_results_to_a_destination_that_is_down_raises(storage: Path) -> None:
    result = write_result(storage, "SEG")
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=dicom_peers.free_port())
    with pytest.raises(DeliveryError, match=r"PACS@127\.0\.0\.1"):
        send_results(destination, "PLEURA", [storage / result["key"]])


def test_send_results_names_a_file_that_is_not_dicom(tmp_path: Path) -> None:
    bogus = tmp_path / "not-dicom.dcm"
    bogus.write_bytes(b"hello")
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=dicom_peers.free_port())
    with pytest.raises(ValueError, match=r"not-dicom\.dcm"):
        send_results(destination, "PLEURA", [bogus])


def test_a_destination_that_is_down_gets_a_retry_schedule_then_fails_with_the_reason(storage: Path) -> None:
    down = Destination(ae_title="PACS", host="127.0.0.1", port=dicom_peers.free_port(), max_attempts=3)
    settings = Settings(storage_dir=storage, destinations=[down], export_retry_seconds=10)
    ledger = Ledger(settings.ledger_url)
    results = analysed_study(ledger, storage)
    ledger.record_analysis(summary(results[:1]))
    [outbox_id] = ledger.create_outbox(STUDY, [down.label], now=T0)
    store = InstanceStore(storage)

    first = deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0)
    assert (first.state, first.retry_in) == ("retry", 10)
    # A duplicate message before the retry is due does nothing.
    assert deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0 + timedelta(seconds=5)).state == "skipped"
    second = deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0 + timedelta(seconds=10))
    assert (second.state, second.retry_in) == ("retry", 20)
    third = deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0 + timedelta(seconds=30))
    assert third.state == "failed"

    [row] = ledger.list_outbox(STUDY)
    assert (row.status, row.attempts) == ("failed", 3)
    assert "cannot associate with PACS@127.0.0.1" in row.last_error
    study = ledger.study_status(STUDY)
    assert study["status"] == "delivery_failed"
    assert f"to {down.label} failed after 3 attempts" in study["reason"]
    assert deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0 + timedelta(days=1)).state == "skipped"
    ledger.close()


def test_a_delivery_succeeds_once_the_destination_is_back(storage: Path, tmp_path: Path) -> None:
    port = dicom_peers.free_port()
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    settings = Settings(storage_dir=storage, destinations=[destination], export_retry_seconds=10)
    ledger = Ledger(settings.ledger_url)
    results = analysed_study(ledger, storage)
    ledger.record_analysis(summary(results[:1]))
    [outbox_id] = ledger.create_outbox(STUDY, [destination.label], now=T0)
    store = InstanceStore(storage)

    assert deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0).state == "retry"
    with dicom_peers.StoreSCP(tmp_path / "pacs", ae_title="PACS", port=port) as pacs:
        outcome = deliver_outbox_entry(ledger, store, settings, outbox_id, now=T0 + timedelta(seconds=10))
        assert outcome.state == "sent", outcome.detail
        dicom_peers.wait_for(lambda: pacs.received(), 10, "storescp to write the file")
        assert received_uids(pacs) == {results[0]["sop_instance_uid"]}
    study = ledger.study_status(STUDY)
    assert (study["status"], study["delivered_at"]) == ("delivered", T0 + timedelta(seconds=10))
    ledger.close()


def test_a_destination_removed_from_the_settings_fails_its_rows(storage: Path) -> None:
    settings = Settings(storage_dir=storage, destinations=[])
    ledger = Ledger(settings.ledger_url)
    ledger.record_analysis(summary(analysed_study(ledger, storage)))
    [seg_row, _] = ledger.create_outbox(STUDY, ["OLDPACS@10.0.0.1:104"], now=T0)

    outcome = deliver_outbox_entry(ledger, InstanceStore(storage), settings, seg_row, now=T0)

    assert outcome.state == "failed"
    assert "no longer in PLEURA_DESTINATIONS" in ledger.outbox_entry(seg_row).last_error
    ledger.close()


def test_node_tasks_record_then_deliver_and_are_idempotent(pacs: dicom_peers.StoreSCP, storage: Path) -> None:
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port)
    settings = Settings(storage_dir=storage, destinations=[destination])
    app = make_celery(settings)
    app.conf.task_always_eager = True  # DELIVER_RESULT runs in-process, right after RECORD_ANALYSIS
    tasks = register_node_tasks(app)
    assert (tasks.record_analysis.name, tasks.deliver_result.name) == (RECORD_ANALYSIS, DELIVER_RESULT)
    assert {RECORD_ANALYSIS, DELIVER_RESULT} <= set(app.tasks)
    ledger = Ledger(settings.ledger_url)
    results = analysed_study(ledger, storage)

    outcome = tasks.record_analysis.apply(args=[summary(results)]).get()

    assert len(outcome["outbox_ids"]) == 2
    dicom_peers.wait_for(lambda: len(pacs.received()) == 2, 10, "storescp to receive SEG and SR")
    assert received_uids(pacs) == {r["sop_instance_uid"] for r in results}
    study = ledger.study_status(STUDY)
    assert (study["status"], study["flagged"], study["probability"]) == ("delivered", True, 0.93)

    # Redelivered: no new outbox row, nothing sent again.
    again = tasks.record_analysis.apply(args=[summary(results)]).get()
    assert again["outbox_ids"] == []
    assert len(ledger.list_outbox(STUDY)) == 2
    for outbox_id in outcome["outbox_ids"]:
        assert tasks.deliver_result.run(outbox_id)["state"] == "skipped"
    assert len(pacs.received()) == 2
    assert ledger.study_status(STUDY)["status"] == "delivered"
    ledger.close()


def test_the_report_is_sent_by_the_recording_task_itself_and_the_rest_through_the_queue(
    pacs: dicom_peers.StoreSCP, storage: Path
) -> None:
    """The SR carries the flag: it is at the PACS when RECORD_ANALYSIS returns, with no
    DELIVER_RESULT run (no broker hop); the SEG waits in the export queue for its own task."""
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port)
    settings = Settings(storage_dir=storage, destinations=[destination])
    app = make_celery(settings)  # the embedded broker, and nobody consuming it
    tasks = register_node_tasks(app)
    ledger = Ledger(settings.ledger_url)
    results = analysed_study(ledger, storage)
    [sr] = [r for r in results if r["kind"] == "SR"]

    outcome = tasks.record_analysis.apply(args=[summary(results)]).get()

    rows = {row.result_kind: row for row in ledger.list_outbox(STUDY)}
    assert (rows["SR"].status, rows["SEG"].status) == ("sent", "pending")
    assert queue_depths(app)["export"] == 1  # the SEG's DELIVER_RESULT
    assert sorted(outcome["outbox_ids"]) == sorted(row.id for row in rows.values())
    dicom_peers.wait_for(lambda: len(pacs.received()) == 1, 10, "storescp to write the SR")
    assert received_uids(pacs) == {sr["sop_instance_uid"]}
    ledger.close()


def test_sent_at_is_when_the_destination_answered_not_when_the_attempt_began(storage: Path) -> None:
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=dicom_peers.free_port())
    settings = Settings(storage_dir=storage, destinations=[destination])
    ledger = Ledger(settings.ledger_url)
    ledger.record_analysis(summary(analysed_study(ledger, storage)[:1]))
    [outbox_id] = ledger.create_outbox(STUDY, [destination.label])
    answered: list[datetime] = []

    def slow_peer(*_: Any) -> list[int]:
        started = datetime.now(timezone.utc)
        while datetime.now(timezone.utc) - started < timedelta(milliseconds=50):  # the peer is storing
            pass
        answered.append(datetime.now(timezone.utc))
        return [0x0000]

    outcome = deliver_outbox_entry(ledger, InstanceStore(storage), settings, outbox_id, sender=slow_peer)

    assert outcome.state == "sent"
    row = ledger.outbox_entry(outbox_id)
    assert row.sent_at >= answered[0]
    ledger.close()


def test_deliver_task_asks_celery_to_retry_with_the_backoff(storage: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = Destination(ae_title="PACS", host="127.0.0.1", port=dicom_peers.free_port())
    settings = Settings(storage_dir=storage, destinations=[down], export_retry_seconds=7)
    app = make_celery(settings)
    tasks = register_node_tasks(app)
    ledger = Ledger(settings.ledger_url)
    ledger.record_analysis(summary(analysed_study(ledger, storage)[:1]))
    [outbox_id] = ledger.create_outbox(STUDY, [down.label])

    requested: dict[str, Any] = {}
    real_retry = tasks.deliver_result.retry

    def recording_retry(**options: Any) -> Exception:
        requested.update(options)
        return real_retry(**options)

    monkeypatch.setattr(tasks.deliver_result, "retry", recording_retry)
    with pytest.raises(Retry):
        tasks.deliver_result.run(outbox_id)

    assert requested["countdown"] == 7  # PLEURA_EXPORT_RETRY_SECONDS for the first retry
    row = ledger.outbox_entry(outbox_id)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.next_attempt_at - row.last_attempt_at == timedelta(seconds=7)  # PLEURA_EXPORT_RETRY_SECONDS
    assert "cannot associate" in row.last_error
    # Celery's eager mode retries at once, ignoring the countdown: the row is not due, so that
    # early duplicate does nothing.
    early = tasks.deliver_result.apply(args=[outbox_id])
    assert early.result["state"] == "skipped"
    assert ledger.outbox_entry(outbox_id).attempts == 1
    ledger.close()


class PickyPACS:
    """A pynetdicom Storage SCP that knows only the calling AE `allowed` and answers every C-STORE
    with `status`."""

    def __init__(self, *, allowed: str = "PLEURA", status: int = 0x0000) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.port = dicom_peers.free_port()
        self.ae = AE(ae_title="PACS")
        self.ae.require_calling_aet = [allowed]
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ExplicitVRLittleEndian)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]
        )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize(
    ("allowed", "status", "permanent"),
    [
        ("SOMEONE", 0x0000, True),  # our AE title is unknown there: rejected-permanent
        ("PLEURA", 0xA900, True),  # data set does not match the SOP class
        ("PLEURA", 0xC001, True),  # cannot understand
        ("PLEURA", 0xA700, False),  # out of resources: worth retrying
    ],
)
def test_a_permanent_refusal_stops_retrying_and_says_why(storage: Path, allowed: str, status: int, permanent: bool) -> None:
    pacs = PickyPACS(allowed=allowed, status=status)
    try:
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port, max_attempts=5)
        settings = Settings(storage_dir=storage, destinations=[destination], export_retry_seconds=10)
        ledger = Ledger(settings.ledger_url)
        results = analysed_study(ledger, storage)
        ledger.record_analysis(summary(results[:1]))
        [outbox_id] = ledger.create_outbox(STUDY, [destination.label], now=T0)

        outcome = deliver_outbox_entry(ledger, InstanceStore(storage), settings, outbox_id, now=T0)

        [row] = ledger.list_outbox(STUDY)
        if permanent:
            assert (outcome.state, row.status, row.attempts) == ("failed", "failed", 1)
            assert row.last_error.startswith("permanent refusal, not retried:")
            assert ledger.study_status(STUDY)["status"] == "delivery_failed"
            if allowed != "PLEURA":
                assert "Calling AE title not recognised" in row.last_error
        else:
            assert (outcome.state, row.status) == ("retry", "pending")
            assert "0xA700" in row.last_error
        ledger.close()
    finally:
        pacs.stop()
