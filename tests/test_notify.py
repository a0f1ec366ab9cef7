"""Notifications: HL7 v2 ORU^R01 over MLLP to a real listener and webhooks to a real HTTP receiver,
from the durable outbox in the ledger, with retries; messages parsed with python-hl7."""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
from datetime import datetime, timedelta, timezone

import hl7
import pytest

from config.destinations import Hl7Destination
from config.settings import SettingsError, load_settings
from node.ledger import Ledger
from node.notify.hl7 import MllpError, send_mllp
from node.notify.loop import Notifier
from notify_peers import MllpListener, WebhookReceiver
from test_tls import Certificates, certificates  # noqa: F401  (the throw-away CA, a module fixture)

STUDY = "1.2.826.0.1.3680043.10.1234.1"
SECRET = "webhook-secret"


@pytest.fixture(scope="module")
def postgres():
    from test_node_ledger import PostgresCluster  # the throw-away server of the ledger tests

    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """None: the default SQLite ledger in the storage dir; else a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres").new_database_url()


def make_notifier(tmp_path, listener_port: int, webhook_url: str, database_url: str | None = None, **extra) -> Notifier:
    if database_url:
        extra["database_url"] = database_url
    settings = load_settings(
        storage_dir=tmp_path,
        hl7_destinations=[{"host": "127.0.0.1", "port": listener_port, "receiving_application": "RIS",
                           "receiving_facility": "RAD", "max_attempts": 3, "timeout_seconds": 5}],
        hl7_sending_facility="GENERAL^HOSPITAL",
        webhooks=[{"url": webhook_url, "secret": SECRET, "max_attempts": 3, "timeout_seconds": 5}],
        notify_retry_seconds=30,
        **extra,
    )
    return Notifier(settings, Ledger(settings.ledger_url))


def analysed_study(
    ledger: Ledger, *, flagged: bool, study: str = STUDY, at: datetime | None = None,
    patient_id: str = "PAT^001&X", accession: str = "ACC-42", reason: str | None = None,
) -> None:
    at = at or datetime.now(timezone.utc)
    sop = study + ".1"
    ledger.record_instance(
        sop_instance_uid=sop, study_uid=study, series_instance_uid=study + ".0", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"instances/{study}/x/{sop}.dcm",
        patient_id=patient_id, accession_number=accession, received_at=at - timedelta(seconds=30),
    )
    ledger.mark_queued(study)
    ledger.record_analysis({
        "study_uid": study,
        "model": {"name": "pleura-demo", "version": "0.3.0", "synthetic_demo": True},
        "images": [{"sop_instance_uid": sop, "status": "analysed", "probability": 0.91 if flagged else 0.08,
                    "flagged": flagged, "area_px": 5000 if flagged else 0, "area_cm2": 12.5 if flagged else None,
                    "reason": reason}],
        "results": [],
        "flagged": flagged,
        "analysed_at": at.isoformat(),
    })


def observations(message: hl7.Message) -> dict[str, tuple[str, str, str]]:
    """OBX by code (OBX-3.1): value (OBX-5), abnormal flag (OBX-8), result status (OBX-11)."""
    found = {}
    for obx in message.segments("OBX"):
        found[str(obx[3][0][0])] = (message.unescape(str(obx[5])), str(obx[8]), str(obx[11]))
    return found


def test_a_flagged_study_is_announced_by_hl7_and_webhook_once(tmp_path, peers, database_url):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url, database_url)
    rule = "classifier 0.910 >= threshold 0.500 and segmented area 5000 px >= minimum 262 px"
    analysed_study(notifier.ledger, flagged=True, reason=rule)

    attempts = notifier.run_once()
    assert [a.sent for a in attempts] == [True, True]
    assert notifier.run_once() == []  # nothing changed: nothing new

    (message,) = listener.messages
    msh = message.segment("MSH")
    assert str(msh[9]) == "ORU^R01^ORU_R01" and str(msh[12]) == "2.5.1"
    assert message.unescape(str(msh[4])) == "GENERAL^HOSPITAL"  # escaped in transit, whole again
    assert str(msh[5]) == "RIS" and str(msh[6]) == "RAD"
    assert message.unescape(str(message.segment("PID")[3])) == "PAT^001&X"
    obr = message.segment("OBR")
    assert str(obr[3]) == "ACC-42" and str(obr[5]) == "S" and str(obr[25]) == "F"
    obx = observations(message)
    assert obx["PTX-FLAG"] == ("SUSPECTED", "AA", "F")
    assert float(obx["PTX-PROB"][0]) == pytest.approx(0.91)
    assert float(obx["PTX-AREA"][0]) == pytest.approx(12.5)
    assert obx["STUDY-UID"][0] == STUDY
    assert "SYNTHETIC DEMO" in obx["PTX-MODEL"][0] and "0.3.0" in obx["PTX-MODEL"][0]
    assert obx["PTX-RULE"][0] == rule  # the model's rule behind the flag, in words

    (request,) = receiver.requests
    body = request["json"]
    assert body["event"] == "flagged" and body["flagged"] is True and body["study_instance_uid"] == STUDY
    assert body["accession_number"] == "ACC-42" and body["probability"] == pytest.approx(0.91)
    assert "PAT^001&X" not in request["raw"].decode()  # no patient identifier in the webhook
    expected = "sha256=" + hmac.new(SECRET.encode(), request["raw"], hashlib.sha256).hexdigest()
    assert request["headers"]["X-Pleura-Signature"] == expected

    # The record of what was sent: the exact payload and the answer.
    sent = {n.channel: n for n in notifier.ledger.list_notifications(STUDY)}
    assert sent["hl7"].status == "sent" and sent["hl7"].attempts == 1
    assert hl7.parse(sent["hl7"].payload).segment("MSH")[10] == msh[10]
    assert "MSA|AA|" in sent["hl7"].response
    assert sent["webhook"].status == "sent" and json.loads(sent["webhook"].payload) == body
    assert sent["webhook"].response.startswith("HTTP 200")


def test_rejecting_the_flag_withdraws_it(tmp_path, peers, database_url):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url, database_url)
    analysed_study(notifier.ledger, flagged=True)
    notifier.run_once()
    notifier.ledger.record_feedback(STUDY, "confirmed", "dr.a")
    assert notifier.run_once() == []  # confirmed: still flagged, nothing to say
    notifier.ledger.record_feedback(STUDY, "rejected", "dr.b")
    assert [a.sent for a in notifier.run_once()] == [True, True]

    withdrawn = listener.messages[-1]
    assert str(withdrawn.segment("OBR")[25]) == "C" and str(withdrawn.segment("OBR")[5]) == "R"
    obx = observations(withdrawn)
    assert obx["PTX-FLAG"] == ("NOT SUSPECTED", "N", "C")
    assert obx["PTX-REVIEW"][0] == "rejected"
    assert receiver.requests[-1]["json"]["event"] == "withdrawn"
    assert receiver.requests[-1]["headers"]["X-Pleura-Event"] == "withdrawn"
    events = [(n.event, n.channel) for n in notifier.ledger.list_notifications(STUDY)]
    assert sorted(events) == [("flagged", "hl7"), ("flagged", "webhook"), ("withdrawn", "hl7"), ("withdrawn", "webhook")]


def test_a_study_not_flagged_is_not_announced(tmp_path, peers):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url)
    analysed_study(notifier.ledger, flagged=False)
    assert notifier.run_once() == []
    assert listener.messages == [] and receiver.requests == []


def test_failures_are_retried_with_backoff_then_given_up(tmp_path):
    receiver = WebhookReceiver(statuses=[503])
    stopped = MllpListener()
    stopped.stop()
    down_port = stopped.port  # nothing listens there until the listener starts again below
    notifier = make_notifier(tmp_path, down_port, receiver.url)
    try:
        now = datetime.now(timezone.utc)
        analysed_study(notifier.ledger, flagged=True, at=now)
        first = notifier.run_once(now=now)
        assert len(first) == 2 and not any(a.sent for a in first)
        rows = {n.channel: n for n in notifier.ledger.list_notifications(STUDY)}
        assert rows["webhook"].last_error.startswith("HTTP 503") and rows["webhook"].attempts == 1
        assert rows["hl7"].status == "pending" and rows["hl7"].attempts == 1 and rows["hl7"].last_error
        assert rows["hl7"].next_attempt_at == now + timedelta(seconds=30)

        assert notifier.run_once(now=now + timedelta(seconds=10)) == []  # not due yet
        # The webhook receiver answers 200 now; the MLLP listener starts on its port.
        listener = MllpListener(port=down_port)
        try:
            second = notifier.run_once(now=now + timedelta(seconds=31))
            assert sorted(a.sent for a in second) == [True, True]
            assert len(listener.messages) == 1 and len(receiver.requests) == 2
            # A retry sends the very same message (same control ID) as the failed attempt.
            assert str(listener.messages[0].segment("MSH")[10]) == str(
                hl7.parse(rows["hl7"].payload).segment("MSH")[10]
            )
        finally:
            listener.stop()

        # A target that keeps refusing is given up after max_attempts, with the reason kept.
        refusing = MllpListener(ack_code="AE")
        (tmp_path / "other").mkdir()
        other = make_notifier(tmp_path / "other", refusing.port, receiver.url)
        try:
            analysed_study(other.ledger, flagged=True, at=now)
            for step in range(3):
                other.run_once(now=now + timedelta(hours=step))
            (hl7_row,) = [n for n in other.ledger.list_notifications(STUDY) if n.channel == "hl7"]
            assert hl7_row.status == "failed" and hl7_row.attempts == 3 and "AE" in hl7_row.last_error
        finally:
            refusing.stop()
    finally:
        receiver.stop()


def test_old_flags_in_a_ledger_from_before_notifications_are_not_announced(tmp_path, peers):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url)
    analysed_study(notifier.ledger, flagged=True, at=datetime.now(timezone.utc) - timedelta(days=3))
    assert notifier.run_once() == []
    # Nor does a later confirmation (the flag stays as it was) announce it.
    notifier.ledger.record_feedback(STUDY, "confirmed", "dr.a")
    assert notifier.run_once() == []
    assert listener.messages == [] and receiver.requests == []


def test_a_new_analysis_that_no_longer_flags_withdraws_the_flag(tmp_path, peers):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url)
    now = datetime.now(timezone.utc)
    analysed_study(notifier.ledger, flagged=True, at=now - timedelta(minutes=5))
    notifier.run_once()
    # The modality sends a corrected image of the same study; the model flags nothing any more.
    ledger = notifier.ledger
    sop = STUDY + ".2"
    ledger.record_instance(
        sop_instance_uid=sop, study_uid=STUDY, series_instance_uid=STUDY + ".0", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"instances/{STUDY}/x/{sop}.dcm", received_at=now,
    )
    ledger.mark_queued(STUDY)
    ledger.record_analysis({
        "study_uid": STUDY, "model": {"name": "pleura-demo", "version": "0.3.0"},
        "images": [
            {"sop_instance_uid": STUDY + ".1", "status": "analysed", "probability": 0.2, "flagged": False},
            {"sop_instance_uid": sop, "status": "analysed", "probability": 0.1, "flagged": False},
        ],
        "results": [], "flagged": False, "analysed_at": now.isoformat(),
    })
    assert [a.sent for a in notifier.run_once()] == [True, True]
    assert str(listener.messages[-1].segment("OBR")[25]) == "C"
    assert [r["json"]["event"] for r in receiver.requests] == ["flagged", "withdrawn"]


# Every HL7 delimiter and the control characters that split segments or end the MLLP frame.
HOSTILE = "|^&~\\\r\n\x00\x0b\x1c"


def test_header_text_cannot_add_segments_or_fields_to_the_oru(tmp_path, peers):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url)
    patient_id = "P1\rOBX|9|ST|FAKE^Injected^L||NEGATIVE" + HOSTILE
    accession = "A\rPID|1||FAKE\n" + HOSTILE
    analysed_study(notifier.ledger, flagged=True, patient_id=patient_id, accession=accession)

    assert [a.sent for a in notifier.run_once()] == [True, True]
    (message,) = listener.messages
    assert [str(segment[0]) for segment in message] == ["MSH", "PID", "ORC", "OBR"] + ["OBX"] * 5
    assert [str(obx[1]) for obx in message.segments("OBX")] == ["1", "2", "3", "4", "5"]
    # The values arrive whole, less their control characters, each in its one field.
    pid = message.segment("PID")
    assert len(pid) == 4 and message.unescape(str(pid[3])) == "P1OBX|9|ST|FAKE^Injected^L||NEGATIVE|^&~\\"
    for field in (message.segment("ORC")[3], message.segment("OBR")[3]):
        assert message.unescape(str(field)) == "APID|1||FAKE|^&~\\"
    assert observations(message)["PTX-FLAG"] == ("SUSPECTED", "AA", "F")
    # Webhooks: JSON escapes by itself; the control characters are gone all the same.
    (request,) = receiver.requests
    assert request["json"]["accession_number"] == "APID|1||FAKE|^&~\\"


def test_an_mllp_end_block_in_a_patient_id_does_not_cut_the_message(tmp_path, peers):
    listener, receiver = peers
    notifier = make_notifier(tmp_path, listener.port, receiver.url)
    analysed_study(notifier.ledger, flagged=True, patient_id="P2\x1c\rMSH|^~\\&|EVIL")

    assert [a.sent for a in notifier.run_once()] == [True, True]
    (message,) = listener.messages  # one frame, the whole message, with its finding
    assert [str(segment[0]) for segment in message][:4] == ["MSH", "PID", "ORC", "OBR"]
    assert message.unescape(str(message.segment("PID")[3])) == "P2MSH|^~\\&|EVIL"
    assert observations(message)["PTX-FLAG"] == ("SUSPECTED", "AA", "F")
    assert observations(message)["STUDY-UID"][0] == STUDY


def test_an_ack_for_another_message_is_not_a_delivery(tmp_path):
    listener = MllpListener(ack_control_id="SOMEONE-ELSES-ID")
    receiver = WebhookReceiver()
    try:
        notifier = make_notifier(tmp_path, listener.port, receiver.url)
        analysed_study(notifier.ledger, flagged=True)
        results = notifier.run_once()
        assert sorted(a.sent for a in results) == [False, True]  # the webhook went; the HL7 did not
        assert len(listener.messages) == 1  # it arrived, but the ACK was not for it
        sent = {n.channel: n for n in notifier.ledger.list_notifications(STUDY)}
        assert sent["hl7"].status == "pending" and sent["hl7"].attempts == 1
        assert "SOMEONE-ELSES-ID" in sent["hl7"].last_error
    finally:
        listener.stop()
        receiver.stop()


def tls_listener(certificates) -> MllpListener:
    """An MLLP listener that speaks TLS only, with the server certificate of the test's CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificates.server), str(certificates.server_key))
    return MllpListener(tls=context)


def test_hl7_over_tls_is_delivered_and_checks_the_listener_certificate(tmp_path, certificates):
    listener = tls_listener(certificates)
    receiver = WebhookReceiver()
    try:
        notifier = make_notifier(tmp_path, listener.port, receiver.url)
        plain = Hl7Destination(host="127.0.0.1", port=listener.port, timeout_seconds=5)
        with pytest.raises(MllpError):  # a TLS listener does not answer plain MLLP
            send_mllp(plain, "MSH|^~\\&|PLEURA||RIS||20260101||ORU^R01|C1|P|2.5.1\r")

        settings = notifier.settings.model_copy(update={"hl7_destinations": [
            Hl7Destination(host="127.0.0.1", port=listener.port, tls=True, tls_ca_file=certificates.ca, timeout_seconds=5),
        ]})
        secure = Notifier(settings, notifier.ledger)
        analysed_study(secure.ledger, flagged=True)
        assert all(attempt.sent for attempt in secure.run_once())
        assert len(listener.messages) == 1
        assert observations(listener.messages[0])["PTX-FLAG"] == ("SUSPECTED", "AA", "F")

        other_ca = Certificates(tmp_path / "other-pki", name="Some other CA")
        untrusted = Hl7Destination(host="127.0.0.1", port=listener.port, tls=True, tls_ca_file=other_ca.ca,
                                   timeout_seconds=5)
        with pytest.raises(MllpError, match="CERTIFICATE_VERIFY_FAILED"):
            send_mllp(untrusted, listener.raw[0].replace("\n", "\r"))
        assert len(listener.messages) == 1  # nothing reached the listener over the untrusted connection
    finally:
        listener.stop()
        receiver.stop()


def test_an_hl7_ca_file_that_does_not_exist_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="tls_ca_file of the HL7 destination"):
        load_settings(storage_dir=tmp_path, hl7_destinations=[{"host": "ris", "port": 2575, "tls": True,
                                                                "tls_ca_file": str(tmp_path / "missing.pem")}])


def test_pleura_check_reaches_a_tls_hl7_listener(tmp_path, certificates, demo_bundle):
    from node.ops.check import reach_hl7

    listener = tls_listener(certificates)
    try:
        good = Hl7Destination(host="127.0.0.1", port=listener.port, tls=True, tls_ca_file=certificates.ca)
        assert reach_hl7(good, timeout=5).startswith("connected (TLSv1.")
        other_ca = Certificates(tmp_path / "other-pki", name="Some other CA")
        with pytest.raises(ssl.SSLCertVerificationError):
            reach_hl7(good.model_copy(update={"tls_ca_file": other_ca.ca}), timeout=5)
    finally:
        listener.stop()
