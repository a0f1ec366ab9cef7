"""The audit trail says who sent what, who was refused and what was sent where; the logs name no
patient, study or instance (only hashed references)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from node.audit import AuditTrail
from node.export import deliver_outbox_entry
from node.ledger import Ledger
from node.privacy import ref
from node.storage import InstanceStore
from test_node_admission import echo, start_node
from test_node_export import STUDY, PickyPACS, analysed_study, summary
from test_node_scp import crafted_cr, pynetdicom_store
from config.destinations import Destination
from config.settings import Settings


def test_receiving_is_audited_and_logged_without_identifiers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node")
    scp, settings, ledger = start_node(tmp_path, allowed_callers=[{"ae_title": "CRAFTED"}, {"ae_title": "ECHOSCU"}])
    try:
        instance = crafted_cr(PatientID="MRN-778899", PatientName="Doe^Jane", AccessionNumber="ACC-4455")
        assert pynetdicom_store(settings.port, instance).Status == 0x0000
        assert pynetdicom_store(settings.port, instance).Status == 0x0000  # sent again
        refused = crafted_cr(StudyInstanceUID=None, PatientID="MRN-778899")
        assert 0xC000 <= pynetdicom_store(settings.port, refused).Status <= 0xCFFF
        assert not echo(settings.port, "STRANGER")
    finally:
        scp.stop()
        ledger.close()

    events = AuditTrail(settings.storage_dir).events()
    kinds = [e["event"] for e in events]
    assert kinds.count("association-accepted") == 3 and "association-rejected" in kinds
    [rejected] = [e for e in events if e["event"] == "association-rejected"]
    assert (rejected["calling_ae"], rejected["address"]) == ("STRANGER", "127.0.0.1")
    [stored] = [e for e in events if e["event"] == "instance-stored"]
    assert (stored["calling_ae"], stored["address"], stored["status"]) == ("CRAFTED", "127.0.0.1", "0x0000")
    assert (stored["study_uid"], stored["sop_instance_uid"]) == (instance.StudyInstanceUID, instance.SOPInstanceUID)
    assert [e["sop_instance_uid"] for e in events if e["event"] == "instance-repeated"] == [instance.SOPInstanceUID]
    [refusal] = [e for e in events if e["event"] == "instance-refused"]
    assert refusal["status"] == "0xC000" and "Study Instance UID" in refusal["reason"]

    text = caplog.text
    assert "stored instance" in text and ref(instance.SOPInstanceUID) in text
    for identifying in (instance.SOPInstanceUID, instance.StudyInstanceUID, refused.SOPInstanceUID, "MRN-778899",
                        "Doe^Jane", "ACC-4455"):
        assert identifying not in text, identifying


def test_deliveries_are_audited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node")
    storage = tmp_path / "storage"
    storage.mkdir()
    pacs = PickyPACS()
    try:
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=pacs.port)
        settings = Settings(storage_dir=storage, destinations=[destination])
        ledger = Ledger(settings.ledger_url)
        results = analysed_study(ledger, storage)
        ledger.record_analysis(summary(results[:1]))
        [outbox_id] = ledger.create_outbox(STUDY, [destination.label])
        assert deliver_outbox_entry(ledger, InstanceStore(storage), settings, outbox_id).state == "sent"
        ledger.close()
    finally:
        pacs.stop()
    [sent] = [e for e in AuditTrail(storage).events() if e["event"] == "result-sent"]
    assert sent["destination"] == destination.label and sent["sop_instance_uid"] == results[0]["sop_instance_uid"]
    assert sent["study_uid"] == STUDY and sent["calling_ae"] == "PLEURA"
    assert results[0]["sop_instance_uid"] not in caplog.text and ref(results[0]["sop_instance_uid"]) in caplog.text


def test_ref_is_short_stable_and_one_way() -> None:
    assert ref("1.2.3") == ref("1.2.3") != ref("1.2.4")
    assert len(ref("1.2.3")) == 13 and "1.2.3" not in ref("1.2.3")
    assert ref(None) == "#-"


# Every text attribute of this header is a single-component name, a value its VR does not allow
# (pydicom warns, quoting it), or holds a control character.
HOSTILE_HEADER = {
    "PatientName": "ZZSECRETNAME\x07",
    "ReferringPhysicianName": "ZZSECRETDOCTOR",
    "PatientID": "ZZSECRETID\r\x1c",
    "AccessionNumber": "ZZSECRETACCESSIONNUMBER-TOO-LONG",
    "PatientBirthDate": "ZZSECRETBIRTH",
    "StudyDate": "2024-99-99",
    "PatientAge": "ZZSECRETAGE",
    "PatientSex": "ZZSECRETSEX",
    "StudyID": "ZZSECRETSTUDYID-WAY-TOO-LONG",
}

LOGGING_PROBE = r'''
import io, sys, pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from node.logs import configure_logging

configure_logging(log_format=sys.argv[1])
from highdicom.valuerep import check_person_name
pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
ds = Dataset()
for keyword, value in HOSTILE.items():
    setattr(ds, keyword, value)
ds.file_meta = FileMetaDataset()
ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
buffer = io.BytesIO()
ds.save_as(buffer, enforce_file_format=False)
buffer.seek(0)
read = pydicom.dcmread(buffer, force=True)  # as the node and the worker read a received header
for element in read:
    element.value
for keyword in ("PatientName", "ReferringPhysicianName"):
    check_person_name(read[keyword].value)  # what highdicom's writers check for every person name
'''


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_library_warnings_never_carry_header_values_into_the_logs(tmp_path: Path, log_format: str) -> None:
    import subprocess
    import sys

    script = f"HOSTILE = {HOSTILE_HEADER!r}\n" + LOGGING_PROBE
    run = subprocess.run([sys.executable, "-c", script, log_format], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    logged = run.stdout + run.stderr
    # The warnings were there, and say what was wrong...
    assert "pydicom: invalid value for VR DA in a header (value not logged)" in logged
    assert "invalid value for VR AS in a header" in logged
    assert "highdicom: a person name with a single component in a header (value not logged)" in logged
    # ...but no value from the header.
    assert "ZZSECRET" not in logged and "2024-99-99" not in logged


# A patient whose every identifier is distinctive, so that any trace of it in a command's output shows.
PATIENT = {"PatientName": "Zzquill^Harriet^Ann", "PatientID": "MRN-ZZ480117", "OtherPatientIDs": "ALT-ZZ5531",
           "PatientBirthDate": "19410317", "InstitutionName": "ZZ St Agatha Infirmary"}
ACCESSIONS = ("ACC-ZZ9071", "ACC-ZZ9072")


def _cli(config: Path, *args: str, env: dict[str, str] | None = None) -> "subprocess.CompletedProcess[str]":
    """`pleura ARGS --config CONFIG` as an operator runs it: its own process, its own logging set-up."""
    import os
    import subprocess
    import sys

    from services import REPO

    clean = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    return subprocess.run(
        [sys.executable, "-m", "pleura.cli", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**clean, "COLUMNS": "250", **(env or {})},
    )


def test_the_operating_commands_log_no_identifier_of_the_studies_they_touch(tmp_path: Path, demo_bundle: Path) -> None:
    """`pleura check`, `db current|upgrade`, `reanalyse`, `models fetch --from-file|compose|promote`
    on a site whose ledger and storage hold two analysed studies of an identifiable patient: neither
    stdout nor stderr holds a name, ID, accession number, date of birth, institution or UID.

    What these commands are asked for never needs one: `reanalyse` answers with the studies'
    worklist references (a one-way hash, `node/privacy.py`), `db` with the ledger's URL, the rest
    with model versions and check lines. So nothing is exempt, and the references are asserted
    present: the commands did touch the studies."""
    from datetime import datetime, timedelta, timezone

    import torch

    from contract.networks import import_torchxrayvision
    from model_versions import make_version
    from node.ledger.migrations import BASELINE, downgrade, schema_state
    from services import write_config
    from training.pretrained import PRETRAINED
    from training.registry import Registry
    from training.synthetic import synthetic_dicom
    from worker.analysis import StudyAnalyser
    from worklist_fixtures import receive_image

    storage = tmp_path / "storage"
    storage.mkdir()
    config = write_config(tmp_path / "pleura.toml", storage_dir=storage, device="cpu", min_free_disk_mb=1)
    registry = Registry(storage / "models")
    registry.import_bundle(make_version(demo_bundle, tmp_path / "v1", "1.0", name="pleura-demo"))
    registry.import_bundle(make_version(demo_bundle, tmp_path / "v2", "2.0", name="pleura-demo"))
    registry.promote("pleura-demo/1.0")

    ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
    store = InstanceStore(storage)
    analyser = StudyAnalyser.from_bundle_dir(storage, demo_bundle, device="cpu")
    identifying: set[str] = {*ACCESSIONS, *PATIENT.values(), "Zzquill", "Harriet"}
    studies = []
    for seed, accession in zip((4711, 4712), ACCESSIONS):
        ds, _ = synthetic_dicom(seed=seed, positive=seed == 4711, size=256)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        item = receive_image(ledger, store, ds, accession, datetime.now(timezone.utc) - timedelta(minutes=5))
        ledger.mark_queued(ds.StudyInstanceUID)
        results = ledger.record_analysis(analyser.analyse(ds.StudyInstanceUID, [item]))
        assert results, "the analysis wrote its results"
        identifying |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, *results}
        studies.append(ds.StudyInstanceUID)
    refs = [ledger.study_ref(uid) for uid in studies]
    ledger.close()
    downgrade(f"sqlite:///{storage / 'ledger.sqlite'}", BASELINE)  # so that `db upgrade` has rows to carry

    published = tmp_path / PRETRAINED["densenet121-res224-all"].file_name
    torch.manual_seed(22)
    torch.save(import_torchxrayvision().models.DenseNet(weights=None).eval(), published)

    runs = {
        "db current (old)": _cli(config, "db", "current"),
        "db upgrade": _cli(config, "db", "upgrade"),
        "db current": _cli(config, "db", "current"),
        "check": _cli(config, "check", "--timeout", "5"),
        "models fetch": _cli(config, "models", "fetch", "densenet121-res224-all", "--from-file", str(published)),
    }
    [fetched] = [key for key in registry.read().versions if key.startswith("xrv-")]
    runs["models compose"] = _cli(config, "models", "compose", fetched, "pleura-demo/1.0")
    runs["reanalyse"] = _cli(config, "reanalyse", refs[0])
    # A promotion re-analyses the recent studies (PLEURA_REANALYSE_HOURS_ON_PROMOTE): the other one.
    runs["models promote"] = _cli(config, "models", "promote", "pleura-demo/2.0",
                                  env={"PLEURA_REANALYSE_HOURS_ON_PROMOTE": "24"})
    expected_codes = {"db current (old)": 1}
    for name, run in runs.items():
        assert run.returncode == expected_codes.get(name, 0), f"{name}: {run.stdout}\n{run.stderr}"
    assert schema_state(f"sqlite:///{storage / 'ledger.sqlite'}").up_to_date
    assert refs[0] in runs["reanalyse"].stdout.split()
    ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
    try:  # both studies are waiting for their re-analysis: the commands did reach them
        assert [ledger.study_status(uid)["status"] for uid in studies] == ["receiving", "receiving"]
    finally:
        ledger.close()

    for name, run in runs.items():
        for stream, text in (("stdout", run.stdout), ("stderr", run.stderr)):
            for value in identifying:
                assert value not in text, f"`pleura {name}` wrote {value!r} to {stream}"
