"""FHIR results: each analysis reported to the EHR as a DiagnosticReport with Observations and the
model as a Device, through the notification outbox, to a FHIR server that validates every resource
with fhir.resources and checks every reference; idempotent by identifier, a correction updating the
same resources."""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from config.settings import load_settings
from node.ledger import Ledger
from node.notify.fhir import post_bundle
from node.notify.loop import Notifier
from notify_peers import FhirServer
from test_notify import HOSTILE, STUDY, analysed_study
from test_tls import Certificates, certificates  # noqa: F401  (the throw-away CA, a module fixture)

SNOMED = "http://snomed.info/sct"


@pytest.fixture
def fhir_server():
    server = FhirServer()
    yield server
    server.stop()


def make_notifier(tmp_path, **fhir) -> Notifier:
    settings = load_settings(storage_dir=tmp_path, fhir=fhir, notify_retry_seconds=30)
    return Notifier(settings, Ledger(settings.ledger_url))


def _finding(server: FhirServer) -> dict:
    [finding] = [kept["resource"] for kept in server.of_type("Observation")
                 if kept["resource"]["code"]["coding"][0] == {"system": SNOMED, "code": "36118008",
                                                               "display": "Pneumothorax (disorder)"}]
    return finding


def test_an_analysis_is_reported_once_and_its_corrections_update_the_same_resources(tmp_path, fhir_server):
    notifier = make_notifier(tmp_path, url=fhir_server.url, patient_identifier_system="urn:oid:2.16.840.1.113883.3.1")
    ledger = notifier.ledger
    analysed_study(ledger, flagged=True)

    [attempt] = notifier.run_once()
    assert attempt.sent, attempt.detail
    assert fhir_server.errors == []
    [report] = fhir_server.of_type("DiagnosticReport")
    resource = report["resource"]
    assert resource["status"] == "final"
    assert resource["identifier"] == [{"system": "urn:pleura:analysis", "value": STUDY}]
    assert resource["imagingStudy"] == [{"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid",
                                                                                  "value": f"urn:oid:{STUDY}"}}]
    assert resource["basedOn"][0]["identifier"]["value"] == "ACC-42"
    assert resource["subject"]["identifier"] == {"system": "urn:oid:2.16.840.1.113883.3.1", "value": "PAT^001&X"}
    assert "SYNTHETIC DEMO MODEL" in resource["conclusion"]
    assert _finding(fhir_server)["valueCodeableConcept"]["coding"][0]["code"] == "52101004"  # present
    codes = {kept["resource"]["code"]["coding"][0]["code"]: kept["resource"] for kept in fhir_server.of_type("Observation")}
    assert codes["probability"]["valueQuantity"]["value"] == 0.91
    assert codes["decision"]["valueBoolean"] is True
    assert codes["area"]["valueQuantity"] == {"value": 12.5, "unit": "cm2", "system": "http://unitsofmeasure.org",
                                              "code": "cm2"}
    [device] = fhir_server.of_type("Device")
    assert device["resource"]["version"] == [{"value": "0.3.0"}]
    assert len(resource["result"]) == len(codes) == 4
    assert [row.status for row in ledger.list_notifications()] == ["sent"]

    assert notifier.run_once() == []  # nothing changed: nothing sent

    # A radiologist rejects the flag: the same report, corrected.
    ledger.record_feedback(STUDY, "rejected", "dr.house")
    [attempt] = notifier.run_once()
    assert attempt.sent, attempt.detail
    [report] = fhir_server.of_type("DiagnosticReport")
    assert (report["resource"]["status"], report["version"]) == ("corrected", 2)
    assert _finding(fhir_server)["valueCodeableConcept"]["coding"][0]["code"] == "2667000"  # absent
    assert _finding(fhir_server)["status"] == "corrected"
    assert len(fhir_server.of_type("Observation")) == 4 and len(fhir_server.of_type("Device")) == 1

    # A new analysis (a re-analysis with another model): the same report, amended.
    later = datetime.now(timezone.utc) + timedelta(minutes=5)
    ledger.record_analysis({
        "study_uid": STUDY, "model": {"name": "pleura-demo", "version": "0.4.0", "synthetic_demo": True},
        "images": [{"sop_instance_uid": STUDY + ".1", "status": "analysed", "probability": 0.12, "flagged": False,
                    "area_px": 0}],
        "results": [], "flagged": False, "analysed_at": later.isoformat(),
    })
    [attempt] = notifier.run_once()
    assert attempt.sent, attempt.detail
    [report] = fhir_server.of_type("DiagnosticReport")
    assert (report["resource"]["status"], report["version"]) == ("amended", 3)
    assert {kept["resource"]["version"][0]["value"] for kept in fhir_server.of_type("Device")} == {"0.3.0", "0.4.0"}
    assert fhir_server.errors == []
    assert [row.event for row in ledger.list_notifications()] == ["amended", "corrected", "final"]


def test_a_bundle_sent_again_changes_nothing(tmp_path, fhir_server):
    notifier = make_notifier(tmp_path, url=fhir_server.url)
    analysed_study(notifier.ledger, flagged=False)
    notifier.enqueue_changes()
    [row] = notifier.ledger.list_notifications()
    post_bundle(notifier.settings.fhir, row.payload)
    post_bundle(notifier.settings.fhir, row.payload)  # an attempt whose answer was lost, say
    assert fhir_server.errors == []
    assert len(fhir_server.of_type("DiagnosticReport")) == 1
    # Not flagged: the finding is absent, no area and no conclusion code.
    assert _finding(fhir_server)["valueCodeableConcept"]["coding"][0]["code"] == "2667000"
    assert "conclusionCode" not in fhir_server.of_type("DiagnosticReport")[0]["resource"]


def _strings(value: object) -> Iterator[str]:
    """Every string in a decoded JSON document, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_header_text_reaches_the_fhir_resources_without_control_characters(tmp_path, fhir_server):
    notifier = make_notifier(tmp_path, url=fhir_server.url, patient_identifier_system="urn:oid:2.16.840.1.113883.3.1")
    patient_id = "P1\rOBX|9|ST|FAKE^Injected^L||NEGATIVE" + HOSTILE + "\x1b[31m\x7f\x85"
    accession = "A\rPID|1||FAKE\n" + HOSTILE
    analysed_study(notifier.ledger, flagged=True, patient_id=patient_id, accession=accession)

    [attempt] = notifier.run_once()
    assert attempt.sent, attempt.detail
    assert fhir_server.errors == []  # every resource still validates (fhir.resources), references resolve
    [bundle] = fhir_server.bundles  # as sent, request URLs included
    controls = re.compile("[\x00-\x1f\x7f-\x9f]")
    assert [text for text in _strings(bundle) if controls.search(text)] == []
    # The values arrive whole, less their control characters; JSON needs no other escaping.
    [report] = fhir_server.of_type("DiagnosticReport")
    resource = report["resource"]
    assert resource["subject"]["identifier"]["value"] == "P1OBX|9|ST|FAKE^Injected^L||NEGATIVE|^&~\\[31m"
    assert resource["basedOn"][0]["identifier"]["value"] == "APID|1||FAKE|^&~\\"


def test_oauth2_client_credentials_over_https_retries_and_a_final_refusal(tmp_path, certificates):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificates.server), str(certificates.server_key))
    server = FhirServer(client_id="pleura", client_secret="s3cret-s3cret", statuses=[503], tls=context)
    try:
        notifier = make_notifier(tmp_path, url=server.url, auth="oauth2", token_url=server.token_url,
                                 client_id="pleura", client_secret="s3cret-s3cret", ca_file=str(certificates.ca))
        analysed_study(notifier.ledger, flagged=True)
        [attempt] = notifier.run_once()  # the server answers 503: tried again later
        assert not attempt.sent and "503" in attempt.detail
        [row] = notifier.ledger.list_notifications()
        assert (row.status, row.attempts) == ("pending", 1)
        attempt = notifier.deliver(row.id, now=datetime.now(timezone.utc) + timedelta(seconds=31))
        assert attempt is not None and attempt.sent, attempt
        assert len(server.of_type("DiagnosticReport")) == 1 and server.errors == []

        # Credentials the token endpoint refuses: a refusal for good, kept with its reason.
        (tmp_path / "wrong").mkdir()
        wrong = make_notifier(tmp_path / "wrong", url=server.url, auth="oauth2", token_url=server.token_url,
                              client_id="pleura", client_secret="not-the-secret", ca_file=str(certificates.ca))
        analysed_study(wrong.ledger, flagged=True)
        [attempt] = wrong.run_once()
        [row] = wrong.ledger.list_notifications()
        assert (row.status, attempt.sent) == ("rejected", False)
        assert "refused the client credentials" in row.last_error
    finally:
        server.stop()


def test_a_fhir_setting_without_its_credentials_names_them(tmp_path):
    from config.settings import SettingsError

    with pytest.raises(SettingsError, match="auth bearer of http://ehr.example/fhir needs token"):
        load_settings(storage_dir=tmp_path, fhir={"url": "http://ehr.example/fhir", "auth": "bearer"})
    with pytest.raises(SettingsError, match="fhir.token_url"):
        load_settings(storage_dir=tmp_path, fhir={"url": "http://ehr.example/fhir", "auth": "oauth2", "client_id": "a",
                                                  "client_secret": "b", "token_url": "http://ehr.example/token"})
