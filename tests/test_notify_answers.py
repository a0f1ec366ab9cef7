"""What the receiver answers to an HL7 message: AR (application reject) is final and shown as
rejected with the receiver's reason; AE (application error) is retried up to the destination's
max_attempts. A real MLLP listener (tests/notify_peers.py) answers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient

from config.settings import load_settings
from node.api.app import create_app
from node.ledger import Ledger
from node.notify.loop import Notifier
from notify_peers import MllpListener
from test_notify import STUDY, analysed_study

TOKEN = "reader-token-0123456789"


def hl7_notifier(tmp_path, port: int, max_attempts: int = 3) -> Notifier:
    settings = load_settings(
        storage_dir=tmp_path,
        hl7_destinations=[{"host": "127.0.0.1", "port": port, "receiving_application": "RIS",
                           "receiving_facility": "RAD", "max_attempts": max_attempts, "timeout_seconds": 5}],
        notify_retry_seconds=30,
        api_users=[{"name": "ms.reader", "role": "read", "token": TOKEN}],
    )
    return Notifier(settings, Ledger(settings.ledger_url))


def test_an_application_reject_is_final_and_shown_as_rejected_with_the_reason(tmp_path):
    listener = MllpListener(ack_code="AR", ack_text="Unknown patient", error_text="PID-3 not on file")
    try:
        notifier = hl7_notifier(tmp_path, listener.port)
        now = datetime.now(timezone.utc)
        analysed_study(notifier.ledger, flagged=True, at=now)
        (attempt,) = notifier.run_once(now=now)
        assert not attempt.sent
        for hours in (1, 5, 30):  # never tried again
            assert notifier.run_once(now=now + timedelta(hours=hours)) == []
        assert len(listener.messages) == 1

        (row,) = notifier.ledger.list_notifications(STUDY)
        assert row.status == "rejected" and row.attempts == 1 and row.next_attempt_at is None
        assert "AR" in row.last_error and "Unknown patient" in row.last_error and "PID-3 not on file" in row.last_error
        assert row.response and "MSA|AR" in row.response

        with TestClient(create_app(notifier.settings, notifier.ledger)) as client:
            (shown,) = client.get("/api/notifications", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert shown["status"] == "rejected"
        assert "Unknown patient" in shown["last_error"] and "PID-3 not on file" in shown["last_error"]
    finally:
        listener.stop()


def test_an_application_error_is_retried_up_to_max_attempts_then_failed(tmp_path):
    listener = MllpListener(ack_code="AE", ack_text="Database busy")
    try:
        notifier = hl7_notifier(tmp_path, listener.port, max_attempts=4)
        now = datetime.now(timezone.utc)
        analysed_study(notifier.ledger, flagged=True, at=now)
        for hours in range(8):
            notifier.run_once(now=now + timedelta(hours=hours))
        (row,) = notifier.ledger.list_notifications(STUDY)
        assert row.status == "failed" and row.attempts == 4
        assert "AE" in row.last_error and "Database busy" in row.last_error
        assert len(listener.messages) == 4
    finally:
        listener.stop()


def test_an_application_error_then_an_accept_is_delivered_on_the_retry(tmp_path):
    listener = MllpListener(ack_codes=["AE"], ack_text="try again")
    try:
        notifier = hl7_notifier(tmp_path, listener.port)
        now = datetime.now(timezone.utc)
        analysed_study(notifier.ledger, flagged=True, at=now)
        assert [a.sent for a in notifier.run_once(now=now)] == [False]
        (row,) = notifier.ledger.list_notifications(STUDY)
        assert row.status == "pending" and row.next_attempt_at == now + timedelta(seconds=30)
        assert [a.sent for a in notifier.run_once(now=now + timedelta(seconds=31))] == [True]
        assert notifier.ledger.list_notifications(STUDY)[0].status == "sent" and len(listener.messages) == 2
    finally:
        listener.stop()
