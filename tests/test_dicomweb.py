"""DICOMweb: results delivered by STOW-RS (to Orthanc's DICOMweb plugin, and to Pleura's own STOW-RS
service to see its refusals), and the STOW-RS service itself: what it stores, refuses and
quarantines, its roles and size limits, and Orthanc pushing a radiograph to it by STOW-RS and
getting the results back the same way."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from config.settings import load_settings
from dicom_peers import free_port, port_open, wait_for
from dicom_samples import synthetic_radiograph
from node.api.server import WorklistServer
from node.export import deliver_outbox_entry
from node.ledger import Ledger
from node.ops.check import reach_http
from node.stow import instance_statuses
from node.storage import InstanceStore
from services import Orthanc
from test_end_to_end import Pleura, _check_results, _wait_for_delivery, synthetic_positive  # noqa: F401 (fixture)
from test_node_export import STUDY, T0, analysed_study, summary

SENDER_TOKEN = "sender-token-0123456789abcdef"
READER_TOKEN = "reader-token-0123456789abcdef"
USERS = [{"name": "orthanc", "role": "sender", "token": SENDER_TOKEN},
         {"name": "ward.viewer", "role": "read", "token": READER_TOKEN}]
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=PLEURA-TEST'


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc (with its DICOMweb plugin) for the module: each test works in studies of its own."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def stow_service(tmp_path: Path) -> Iterator[WorklistServer]:
    """Pleura's API (with the STOW-RS service) on its own storage and ledger."""
    storage = tmp_path / "receiver"
    storage.mkdir()
    settings = load_settings(storage_dir=storage, api_users=USERS, api_port=free_port(), stow_max_part_bytes=600_000,
                             stow_max_request_bytes=2_000_000)
    server = WorklistServer(settings, Ledger(settings.ledger_url))
    server.start()
    yield server
    server.stop()


def _deliver_all(tmp_path: Path, destination: dict) -> tuple[Ledger, list]:
    """A study with a SEG and an SR in the ledger, each delivered once to `destination`."""
    storage = tmp_path / "storage"
    storage.mkdir(parents=True)
    settings = load_settings(storage_dir=storage, destinations=[destination], export_retry_seconds=10)
    ledger = Ledger(settings.ledger_url)
    ledger.record_analysis(summary(analysed_study(ledger, storage)))
    label = settings.destinations[0].label
    ids = ledger.create_outbox(STUDY, [label], now=T0)
    outcomes = [deliver_outbox_entry(ledger, InstanceStore(storage), settings, i, now=T0) for i in ids]
    return ledger, outcomes


def _multipart(*parts: bytes) -> bytes:
    body = b"".join(b"--PLEURA-TEST\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for part in parts)
    return body + b"--PLEURA-TEST--\r\n"


def _part10(dataset: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_results_reach_a_dicomweb_archive_by_stow_rs(tmp_path: Path, orthanc: Orthanc) -> None:
    ledger, outcomes = _deliver_all(tmp_path, {"kind": "dicomweb", "url": orthanc.dicomweb_url, "timeout_seconds": 20})
    assert [o.state for o in outcomes] == ["sent", "sent"], outcomes
    rows = ledger.list_outbox(STUDY)
    held = {tags["SOPInstanceUID"] for tags in orthanc.instances()}
    assert {row.result_uid for row in rows} <= held
    assert {row.destination for row in rows} == {orthanc.dicomweb_url}
    assert ledger.study_status(STUDY)["status"] == "delivered"
    settings = load_settings(storage_dir=tmp_path, destinations=[{"kind": "dicomweb", "url": orthanc.dicomweb_url}])
    assert reach_http(settings.destinations[0], "studies?limit=1", 20) == "HTTP 200"  # what `pleura check` does


def test_stow_refusals_are_final_and_unreachable_archives_are_tried_again(tmp_path: Path, stow_service) -> None:
    """Pleura's own STOW-RS service as the archive: it refuses the (unreadable) SEG with a failure
    reason and stores the SR; a wrong token is refused for good; no answer is tried again."""
    url = f"{stow_service.url}/dicomweb"
    ledger, outcomes = _deliver_all(tmp_path / "good", {"kind": "dicomweb", "url": url, "auth": "bearer",
                                                        "token": SENDER_TOKEN, "max_attempts": 5})
    by_kind = {row.result_kind: row for row in ledger.list_outbox(STUDY)}
    assert (by_kind["SR"].status, by_kind["SEG"].status, by_kind["SEG"].attempts) == ("sent", "failed", 1)
    assert by_kind["SEG"].last_error.startswith("permanent refusal, not retried:")
    assert "0xA900" in by_kind["SEG"].last_error  # the SEG cannot be read as labels: does not match its class
    assert ledger.study_status(STUDY)["status"] == "delivery_failed"

    ledger, _ = _deliver_all(tmp_path / "wrong", {"kind": "dicomweb", "url": url, "auth": "basic",
                                                  "username": "orthanc", "password": "not-the-token-0123456789"})
    assert {(row.status, row.attempts) for row in ledger.list_outbox(STUDY)} == {("failed", 1)}
    assert all("HTTP 401" in row.last_error for row in ledger.list_outbox(STUDY))

    ledger, outcomes = _deliver_all(tmp_path / "down", {"kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dw"})
    assert {o.state for o in outcomes} == {"retry"}
    assert all(row.status == "pending" and "cannot reach" in row.last_error for row in ledger.list_outbox(STUDY))
    assert {round(o.retry_in) for o in outcomes} == {10}


def test_a_stow_answer_with_warnings_is_a_success_and_the_warning_is_kept(tmp_path: Path) -> None:
    answer = Dataset.from_json({
        "00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": ["1.2.3.1"]}, "00081196": {"vr": "US", "Value": [0xB000]}},
            {"00081155": {"vr": "UI", "Value": ["1.2.3.2"]}}]},
        "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.3"]},
                                             "00081197": {"vr": "US", "Value": [0xC122]}}]},
    })
    assert instance_statuses(answer, ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]) == [0xB000, 0, 0xC122, 0]
    storage = tmp_path / "storage"
    storage.mkdir()
    ledger = Ledger(load_settings(storage_dir=storage).ledger_url)
    ledger.record_analysis(summary(analysed_study(ledger, storage)))
    first, second = ledger.create_outbox(STUDY, ["https://archive/dicomweb"], now=T0)
    ledger.record_delivery_success(first, now=T0, response="stored it with warning 0xB000")
    ledger.record_delivery_success(second, now=T0 + timedelta(seconds=1))
    assert [row.response for row in ledger.list_outbox(STUDY)] == ["stored it with warning 0xB000", None]


def test_the_stow_service_stores_refuses_and_quarantines_per_instance(stow_service) -> None:
    settings = stow_service.settings
    ledger = Ledger(settings.ledger_url)
    url = f"{stow_service.url}/dicomweb/studies"
    image = synthetic_radiograph()
    body = _multipart(_part10(image), b"not a DICOM file at all", b"\0" * 700_000)
    headers = {"Content-Type": STOW_TYPE, "Authorization": f"Bearer {SENDER_TOKEN}"}

    answer = requests.post(url, data=body, headers=headers, timeout=60)
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    response = Dataset.from_json(answer.json())
    assert [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence] == [image.SOPInstanceUID]
    assert [int(item.FailureReason) for item in response.FailedSOPSequence] == [0xC000, 0xA700]
    assert ledger.has_instance(image.SOPInstanceUID)  # acknowledged: stored and recorded
    assert InstanceStore(settings.storage_dir).path(
        InstanceStore.instance_key(image.StudyInstanceUID, image.SeriesInstanceUID, image.SOPInstanceUID)).is_file()
    quarantined = sorted((settings.storage_dir / "quarantine").glob("*.reason.txt"))
    assert len(quarantined) == 1 and "not a DICOM Part 10 file" in quarantined[0].read_text()
    assert list((settings.storage_dir / "incoming").iterdir()) == []

    # The same instance again, by dicomweb-client (HTTP Basic with the sender's name and token).
    client = DICOMwebClient(f"{stow_service.url}/dicomweb", headers={
        "Authorization": "Basic " + base64.b64encode(f"orthanc:{SENDER_TOKEN}".encode()).decode()})
    again = client.store_instances([image])
    assert [str(item.ReferencedSOPInstanceUID) for item in again.ReferencedSOPSequence] == [image.SOPInstanceUID]
    assert len(ledger.list_instances(image.StudyInstanceUID)) == 1

    only_bad = requests.post(url, data=_multipart(b"garbage"), headers=headers, timeout=60)
    assert only_bad.status_code == 409
    too_large = requests.post(url, data=_multipart(b"\0" * 2_100_000), headers=headers, timeout=60)
    assert too_large.status_code == 413 and "PLEURA_STOW_MAX_REQUEST_BYTES" in too_large.text
    wrong_type = requests.post(url, data=b"{}", headers={**headers, "Content-Type": "application/json"}, timeout=60)
    assert wrong_type.status_code == 415


def test_only_senders_may_stow_and_senders_see_nothing(stow_service) -> None:
    url = stow_service.url
    body = _multipart(_part10(synthetic_radiograph()))
    assert requests.post(f"{url}/dicomweb/studies", data=body, headers={"Content-Type": STOW_TYPE}).status_code == 401
    reader = {"Content-Type": STOW_TYPE, "Authorization": f"Bearer {READER_TOKEN}"}
    assert requests.post(f"{url}/dicomweb/studies", data=body, headers=reader).status_code == 403
    sender = {"Authorization": f"Bearer {SENDER_TOKEN}"}
    assert requests.get(f"{url}/api/studies", headers=sender).status_code == 403
    assert requests.post(f"{url}/api/session", json={"token": SENDER_TOKEN}).status_code == 403


def test_orthanc_stows_a_radiograph_to_pleura_and_gets_the_results_back_by_stow_rs(
    tmp_path: Path, demo_bundle: Path, orthanc: Orthanc, synthetic_positive: tuple[Path, pydicom.Dataset]
) -> None:
    _, image = synthetic_positive
    DICOMwebClient(orthanc.dicomweb_url).store_instances([image])  # the study is at the PACS
    api_port = free_port()
    pleura = Pleura(
        tmp_path, demo_bundle, orthanc, broker_url=None,
        destinations=[{"kind": "dicomweb", "url": orthanc.dicomweb_url}],
        api_users=USERS, api_port=api_port, api_host="127.0.0.1",
    )
    try:
        wait_for(lambda: port_open(api_port) or not pleura.node.alive(), 60, "the node's API to listen")
        orthanc.add_dicomweb_server("pleura", f"http://127.0.0.1:{api_port}/dicomweb",
                                    {"Authorization": f"Bearer {SENDER_TOKEN}"})
        orthanc.stow_study("pleura", image.StudyInstanceUID)  # an error unless every instance was stored
        ledger = pleura.ledger
        assert ledger.has_instance(image.SOPInstanceUID)  # in the ledger before the answer came
        _wait_for_delivery(pleura, {image.StudyInstanceUID})
        _check_results(orthanc, image, tmp_path, ledger, {"SR", "SEG", "GSPS", "SC"})
        rows = ledger.list_outbox(image.StudyInstanceUID)
        assert {(row.destination, row.status) for row in rows} == {(orthanc.dicomweb_url, "sent")}
    finally:
        pleura.stop()
