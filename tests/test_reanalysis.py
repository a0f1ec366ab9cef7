"""A study analysed again after a promotion (`pleura reanalyse`), end to end with real peers:
`pleura node` and `pleura worker` following a model registry, Orthanc as the PACS, a real MLLP
listener as the RIS. The new results arrive in a new series, the new report supersedes the earlier
one, the worklist shows the newest analysis with the history, and the changed decision goes to
the RIS as an HL7 correction."""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
from fastapi.testclient import TestClient

from config.settings import load_settings
from node.api.app import create_app
from node.ledger import Ledger
from notify_peers import MllpListener
from services import REPO, wait_for
from test_end_to_end import RESULT_TIMEOUT, Pleura, orthanc  # noqa: F401 (the fixture)
from model_versions import make_version
from training.registry import Registry
from training.synthetic import synthetic_dicom
from worklist_fixtures import API_USERS, READER_TOKEN


def _delivered_analyses(pleura: Pleura, study_uid: str, count: int) -> None:
    """Wait until the study has ``count`` analyses and is delivered again (state, not logs)."""
    ledger = pleura.ledger

    def done() -> bool:
        assert pleura.node.alive() and pleura.worker.alive(), pleura.logs()
        status = (ledger.study_status(study_uid) or {}).get("status")
        assert status not in ("failed", "delivery_failed"), pleura.logs()
        return status == "delivered" and len(ledger.list_analyses(study_uid)) == count

    wait_for(done, RESULT_TIMEOUT, f"analysis {count} of the study delivered", interval=1.0)


def test_a_study_reanalysed_with_a_promoted_model_is_delivered_anew_and_corrected(tmp_path, demo_bundle, orthanc):
    image, _ = synthetic_dicom(seed=4243, positive=True, size=512)
    image_path = tmp_path / "image.dcm"
    image.save_as(image_path, enforce_file_format=True)
    registry = Registry(tmp_path / "models")
    registry.import_bundle(make_version(demo_bundle, tmp_path / "bundle-1", "1.0", name="pleura-demo"))
    # Version 2.0 flags nothing that is not near-certain: the decision on this study changes.
    strict = load_bundle_thresholds(demo_bundle, probability=1.0)
    registry.import_bundle(make_version(demo_bundle, tmp_path / "bundle-2", "2.0", name="pleura-demo", thresholds=strict))
    registry.promote("pleura-demo/1.0")
    ris = MllpListener()
    env = {"PLEURA_HL7_DESTINATIONS": json.dumps([{"host": "127.0.0.1", "port": ris.port}])}
    pleura = Pleura(tmp_path, registry.root, orthanc, broker_url=None, env=env)
    try:
        assert pleura.storescu(image_path).returncode == 0
        study_uid = image.StudyInstanceUID
        _delivered_analyses(pleura, study_uid, 1)
        ledger = pleura.ledger
        assert ledger.study_status(study_uid)["flagged"] is True
        wait_for(lambda: len(ris.messages) == 1, 60, "the flag announced to the RIS")
        first_sr = _reports(orthanc, study_uid, tmp_path)
        assert [sr.SoftwareVersions for sr in first_sr] == ["1.0"]

        registry.promote("pleura-demo/2.0")
        # The worker warms 2.0 beside 1.0 and analyses with 1.0 until it is warm: re-analyse then.
        wait_for(
            lambda: any(report.get("state") == "ready" and str(report.get("loaded")).startswith("pleura-demo 2.0 ")
                        for report in registry.workers()),
            RESULT_TIMEOUT, "the worker to warm version 2.0", interval=0.5,
        )
        ref = ledger.study_ref(study_uid)
        command = subprocess.run(
            [sys.executable, "-m", "pleura.cli", "reanalyse", ref, "--config", str(pleura.config)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )
        assert command.returncode == 0, command.stderr
        assert ref in command.stdout.split()
        _delivered_analyses(pleura, study_uid, 2)

        # The new results are at the PACS, in new series; the new report supersedes the earlier one.
        reports = {sr.SoftwareVersions: sr for sr in _reports(orthanc, study_uid, tmp_path)}
        assert set(reports) == {"1.0", "2.0"}
        old, new = reports["1.0"], reports["2.0"]
        assert new.SeriesInstanceUID != old.SeriesInstanceUID
        [predecessor] = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
        comments = [item.TextValue for item in new.ContentSequence if item.ValueType == "TEXT"]
        assert any("supersedes the earlier Pleura report" in text for text in comments), comments

        # The worklist: the newest analysis in force, the earlier one kept.
        settings = load_settings(storage_dir=pleura.storage, api_users=API_USERS, model_registry_dir=registry.root)
        with TestClient(create_app(settings, Ledger(settings.ledger_url))) as client:
            detail = client.get(f"/api/studies/{ref}", headers={"Authorization": f"Bearer {READER_TOKEN}"}).json()
        assert [(a["model_version"], a["flagged"], a["reanalysis"], a["current"]) for a in detail["analyses"]] == [
            ("2.0", False, True, True),
            ("1.0", True, False, False),
        ]
        assert detail["model"]["version"] == "2.0" and detail["flagged"] is False

        # The changed decision reached the RIS as a correction.
        wait_for(lambda: len(ris.messages) == 2, 60, "the correction sent to the RIS")
        obr = next(line for line in str(ris.messages[1]).split("\r") if line.startswith("OBR"))
        assert obr.split("|")[25] == "C"
    finally:
        pleura.stop()
        ris.stop()


def load_bundle_thresholds(bundle, **changes):
    from contract.bundle import load_bundle

    return load_bundle(bundle).manifest.thresholds.model_copy(update=changes)


def _reports(orthanc, study_uid: str, folder) -> list[pydicom.Dataset]:
    found = []
    for tags in orthanc.instances():
        if tags.get("StudyInstanceUID") == study_uid and tags.get("SOPClassUID") == pydicom.uid.ComprehensiveSRStorage:
            found.append(pydicom.dcmread(orthanc.download(tags["_id"], folder / f"{tags['_id']}.dcm")))
    return found
