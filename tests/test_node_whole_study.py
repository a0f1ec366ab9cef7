"""A whole study pushed to the SCP: the images are analysed, everything else (reports, presentation
states, documents, key objects, Pleura's own results coming back) is acknowledged, recorded as
skipped with the reason, kept or not, and never analysed nor re-opens a study."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, GrayscaleSoftcopyPresentationStateStorage

import dicom_peers
from dicom_samples import (
    comprehensive_sr,
    encapsulated_pdf,
    key_object_selection,
    presentation_state,
    save_dataset,
    synthetic_radiograph,
)
from node.api.app import create_app
from node.ledger import Ledger, utcnow
from node.settle import SettleLoop
from scp_node import Node, running_node
from test_node_scp import pynetdicom_store
from worklist_fixtures import API_USERS, RADIOLOGIST_TOKEN, READER_TOKEN

SR_REASON = "Comprehensive SR Storage is not an image Pleura analyses"
GSPS_REASON = "Grayscale Softcopy Presentation State Storage is not an image Pleura analyses"


@pytest.fixture
def discarding_node(tmp_path: Path) -> Iterator[Node]:
    """The SCP with keep_unanalysed_objects off (and a worklist API user to look with)."""
    yield from running_node(tmp_path, keep_unanalysed_objects=False, api_users=API_USERS)


def stored_files(node: Node) -> list[Path]:
    folder = node.settings.storage_dir / "instances"
    return sorted(p for p in folder.rglob("*.dcm")) if folder.exists() else []


def dispatch_once(ledger: Ledger) -> dict[str, list[str]]:
    """One settle round as if the study had been quiet long enough: what each dispatched study sent."""
    sent: dict[str, list[str]] = {}

    def dispatch(study: str, instances: list[dict[str, str]]) -> str:
        sent[study] = [item["sop_instance_uid"] for item in instances]
        return "task-1"

    SettleLoop(ledger, dispatch, settle_seconds=0).run_once(utcnow() + timedelta(seconds=1))
    return sent


def record_analysed(ledger: Ledger, image: Dataset, results: list[dict[str, str]] = ()) -> None:
    """The worker's summary: `image` analysed, not flagged, with `results`."""
    ledger.record_analysis(
        {
            "study_uid": image.StudyInstanceUID,
            "model": {"name": "pleura-demo", "version": "1", "synthetic_demo": True},
            "images": [{"sop_instance_uid": image.SOPInstanceUID, "status": "analysed", "probability": 0.1,
                        "flagged": False}],
            "results": list(results),
            "flagged": False,
        }
    )


def test_storescu_sends_a_study_with_a_report_a_pdf_and_a_key_object_in_one_association(
    node: Node, tmp_path: Path
) -> None:
    image = synthetic_radiograph(modality="CR", rows=128, columns=128)
    others = {
        SR_REASON: comprehensive_sr(image),
        "Encapsulated PDF Storage is not an image Pleura analyses": encapsulated_pdf(image),
        "Key Object Selection Document Storage is not an image Pleura analyses": key_object_selection(image),
    }
    folder = tmp_path / "study"
    save_dataset(image, folder / "cr.dcm")
    for index, ds in enumerate(others.values()):
        save_dataset(ds, folder / f"other{index}.dcm")

    sent = dicom_peers.storescu(node.port, [folder], called_ae="PLEURA", options=["+sd"])

    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.count("Received Store Response (Success)") == 4, sent.stderr
    assert sent.stderr.count("Requesting Association") == 1, sent.stderr
    instances = {i.sop_instance_uid: i for i in node.ledger.list_instances(image.StudyInstanceUID)}
    assert instances[image.SOPInstanceUID].analysis_status == "pending"
    for reason, ds in others.items():
        recorded = instances[ds.SOPInstanceUID]
        assert (recorded.analysis_status, recorded.analysis_reason) == ("skipped", reason)
        # Kept (the default), as sent.
        assert pydicom.dcmread(node.store.path(recorded.storage_key)).SOPInstanceUID == ds.SOPInstanceUID
    assert len(stored_files(node)) == 4
    assert [i.sop_instance_uid for i in node.ledger.list_images(image.StudyInstanceUID)] == [image.SOPInstanceUID]

    # Only the image goes to a worker; the skipped objects do not make the analysed study look failed.
    assert dispatch_once(node.ledger) == {image.StudyInstanceUID: [image.SOPInstanceUID]}
    record_analysed(node.ledger, image)
    status = node.ledger.study_status(image.StudyInstanceUID)
    assert (status["status"], status["reason"], status["instances"]) == ("done", None, 4)


def test_a_study_of_objects_pleura_does_not_analyse_is_not_analysed_with_why(node: Node) -> None:
    image = synthetic_radiograph(modality="CR", rows=128, columns=128)
    report, state = comprehensive_sr(image), presentation_state(image)

    assert pynetdicom_store(node.port, report, ComprehensiveSRStorage).Status == 0x0000
    assert pynetdicom_store(node.port, state, GrayscaleSoftcopyPresentationStateStorage).Status == 0x0000

    status = node.ledger.study_status(image.StudyInstanceUID)
    assert status["status"] == "not_analysed"
    assert status["reason"] == f"{SR_REASON}; {GSPS_REASON}"
    assert image.StudyInstanceUID not in status["reason"] and report.SOPInstanceUID not in status["reason"]
    assert dispatch_once(node.ledger) == {}

    # The image arrives later: the study is analysed as usual.
    assert pynetdicom_store(node.port, image).Status == 0x0000
    assert node.ledger.study_status(image.StudyInstanceUID)["status"] == "receiving"
    assert dispatch_once(node.ledger) == {image.StudyInstanceUID: [image.SOPInstanceUID]}
    record_analysed(node.ledger, image)
    assert node.ledger.study_status(image.StudyInstanceUID)["status"] == "done"


def test_pleuras_own_results_coming_back_are_acknowledged_not_kept_and_reopen_nothing(node: Node) -> None:
    image = synthetic_radiograph(modality="CR", rows=128, columns=128)
    assert pynetdicom_store(node.port, image).Status == 0x0000
    assert dispatch_once(node.ledger) == {image.StudyInstanceUID: [image.SOPInstanceUID]}
    own_sr = comprehensive_sr(image, manufacturer="Some PACS")  # a PACS may rewrite the header, not the UID
    record_analysed(
        node.ledger, image,
        [{"kind": "SR", "sop_instance_uid": own_sr.SOPInstanceUID, "sop_class_uid": ComprehensiveSRStorage,
          "key": f"results/{image.StudyInstanceUID}/{own_sr.SOPInstanceUID}.dcm",
          "source_sop_instance_uid": image.SOPInstanceUID}],
    )
    before = node.ledger.study_status(image.StudyInstanceUID)
    assert before["status"] == "done"
    marked = comprehensive_sr(image, manufacturer="Pleura")  # an earlier version's report, say

    for ds in (own_sr, marked):
        assert pynetdicom_store(node.port, ds, ComprehensiveSRStorage).Status == 0x0000

    assert [i.sop_instance_uid for i in node.ledger.list_instances(image.StudyInstanceUID)] == [image.SOPInstanceUID]
    assert len(stored_files(node)) == 1
    # A viewer's presentation state of the analysed study is recorded, and re-opens nothing either.
    state = presentation_state(image)
    assert pynetdicom_store(node.port, state, GrayscaleSoftcopyPresentationStateStorage).Status == 0x0000
    assert node.ledger.study_status(image.StudyInstanceUID) == before | {"instances": 2}
    assert dispatch_once(node.ledger) == {}
    events = [(e["event"], e.get("reason")) for e in node.scp.audit.events() if e["event"].startswith("instance-")]
    assert events[-3:] == [
        ("instance-repeated", "Pleura's own Comprehensive SR Storage"),
        ("instance-repeated", "Pleura's own Comprehensive SR Storage"),
        ("instance-stored", GSPS_REASON),
    ]


def test_discarded_objects_are_recorded_not_written_and_the_worklist_and_export_still_work(
    discarding_node: Node,
) -> None:
    node = discarding_node
    image = synthetic_radiograph(modality="CR", rows=128, columns=128)
    report = comprehensive_sr(image)
    assert pynetdicom_store(node.port, report, ComprehensiveSRStorage).Status == 0x0000
    assert pynetdicom_store(node.port, image).Status == 0x0000
    assert pynetdicom_store(node.port, report, ComprehensiveSRStorage).Status == 0x0000  # sent again

    [skipped, kept] = node.ledger.list_instances(image.StudyInstanceUID)
    assert (skipped.sop_instance_uid, skipped.analysis_status) == (report.SOPInstanceUID, "skipped")
    assert skipped.storage_key == ""  # recorded with no file
    assert [p.name for p in stored_files(node)] == [f"{image.SOPInstanceUID}.dcm"]
    events = [(e["event"], e["sop_instance_uid"]) for e in node.scp.audit.events() if e["event"].startswith("instance-")]
    assert events == [
        ("instance-discarded", report.SOPInstanceUID),
        ("instance-stored", image.SOPInstanceUID),
        ("instance-repeated", report.SOPInstanceUID),
    ]

    assert dispatch_once(node.ledger) == {image.StudyInstanceUID: [image.SOPInstanceUID]}
    record_analysed(node.ledger, image)
    with TestClient(create_app(node.settings, node.ledger)) as client:
        reader = {"Authorization": f"Bearer {READER_TOKEN}"}
        [study] = client.get("/api/studies", headers=reader).json()
        assert (study["status"], study["reason"]) == ("done", None)
        detail = client.get(f"/api/studies/{study['ref']}", headers=reader).json()
        assert [i["sop_instance_uid"] for i in detail["images"]] == [image.SOPInstanceUID]
        assert client.get(f"/api/studies/{study['ref']}/images/1/preview.png", headers=reader).status_code == 404
        radiologist = {"Authorization": f"Bearer {RADIOLOGIST_TOKEN}"}
        given = client.post(f"/api/studies/{study['ref']}/feedback", headers=radiologist, json={"verdict": "rejected"})
        assert given.status_code == 201, given.text
        [exported] = client.get("/api/feedback/export", headers=radiologist).json()
    assert [i["instance_key"] for i in exported["images"]] == [kept.storage_key]
    assert node.store.path(kept.storage_key).is_file()
