"""The SCP against real senders: DCMTK echoscu/storescu and crafted datasets sent with pynetdicom."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    generate_uid,
)
from prometheus_client import CollectorRegistry
from pynetdicom import AE, _config
from sqlalchemy import text

import dicom_peers
from node.ledger import utcnow
from node.ops.metrics import IDENTITY_CONFLICTS
from node.receive import ANALYSED_SOP_CLASSES
from node.scp import TRANSFER_SYNTAXES
from node.seg_labels import SEG_TRANSFER_SYNTAXES, SEGMENTATION_SOP_CLASS
from node.settle import SettleLoop
from node.storage import reason_file
from scp_node import Node

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
PRIVATE_SOP_CLASS = "1.3.12.2.1107.5.9.1"  # a vendor's private non-image storage class
BIG_ENDIAN = "1.2.840.10008.1.2.2"  # retired


def crafted_cr(**attributes: object) -> Dataset:
    """A small CR data set (no pixel data needed to be stored); None removes an attribute."""
    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "TEST-1"
    ds.Modality = "CR"
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.file_meta.MediaStorageSOPInstanceUID = (
        attributes.get("SOPInstanceUID") or ds.get("SOPInstanceUID") or generate_uid()
    )
    return ds


def pynetdicom_store(
    port: int, dataset: Dataset | Path, sop_class: str = CR, transfer_syntax: str = ExplicitVRLittleEndian
) -> Dataset:
    """C-STORE one data set (or file) with pynetdicom; returns the response status data set."""
    ae = AE(ae_title="CRAFTED")
    ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    assert assoc.is_established
    try:
        return assoc.send_c_store(dataset)
    finally:
        assoc.release()


def test_echo_answers_only_to_our_ae_title(node: Node) -> None:
    ok = dicom_peers.echoscu(node.port, "PLEURA")
    assert ok.returncode == 0, ok.stderr

    wrong = dicom_peers.echoscu(node.port, "SOMEONE")
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr


@pytest.mark.parametrize(
    ("name", "options"),
    [("RG1_UNCR.dcm", []), ("RG1_J2KR.dcm", ["-xv"]), ("RG1_J2KI.dcm", ["-xw"]), ("693_J2KR.dcm", ["-xv"])],
)
def test_storescu_radiograph_is_stored_as_sent_and_recorded_once(node: Node, name: str, options: list[str]) -> None:
    source = dicom_peers.testdata_file(name)
    original = pydicom.dcmread(source)

    sent = dicom_peers.storescu(node.port, [source], called_ae="PLEURA", options=options)
    assert sent.returncode == 0, sent.stderr
    assert "Received Store Response (Success)" in sent.stderr

    instances = node.ledger.list_instances(original.StudyInstanceUID)
    assert [i.sop_instance_uid for i in instances] == [original.SOPInstanceUID]
    instance = instances[0]
    assert (instance.sop_class_uid, instance.calling_ae) == (original.SOPClassUID, "STORESCU")
    # Received in the file's own transfer syntax: the compressed pixel data was not touched.
    assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    stored = pydicom.dcmread(node.store.path(instance.storage_key))
    assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    # storescu drops Data Set Trailing Padding and recomputes group lengths: leave those out.
    for dataset in (original, stored):
        for tag in [elem.tag for elem in dataset if elem.tag.element == 0 or elem.tag == 0xFFFCFFFC]:
            del dataset[tag]
    assert stored == original
    assert stored.PixelData == original.PixelData

    # Sent again: still one instance, and the study is dispatched once.
    dispatched: list[str] = []
    loop = SettleLoop(node.ledger, lambda study, instances: dispatched.append(study) or "task-1", settle_seconds=0)
    assert loop.run_once(utcnow() + timedelta(seconds=1)) == [original.StudyInstanceUID]
    again = dicom_peers.storescu(node.port, [source], called_ae="PLEURA", options=options)
    assert again.returncode == 0, again.stderr
    assert loop.run_once(utcnow() + timedelta(seconds=1)) == []
    assert dispatched == [original.StudyInstanceUID]
    assert len(node.ledger.list_instances(original.StudyInstanceUID)) == 1
    assert node.ledger.study_status(original.StudyInstanceUID)["status"] == "queued"


def test_negotiation_accepts_the_listed_classes_and_syntaxes_only(node: Node) -> None:
    # JPEG-LS, HTJ2K and JPEG Extended are decoded by the worker, so accepted for the images.
    assert {JPEGLSLossless, JPEGLSNearLossless, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, JPEGExtended12Bit} <= set(
        TRANSFER_SYNTAXES
    )
    ae = AE(ae_title="NEGOTIATE")
    for sop_class in ANALYSED_SOP_CLASSES:
        for transfer_syntax in TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, transfer_syntax)
    for transfer_syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(SEGMENTATION_SOP_CLASS, transfer_syntax)
    # Objects of a whole study that are not analysed are accepted too; a private class is not.
    others = (ENCAPSULATED_PDF, MR, COMPREHENSIVE_SR)
    for sop_class in others:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.add_requested_context(COMPREHENSIVE_SR, JPEGLSLossless)
    ae.add_requested_context(PRIVATE_SOP_CLASS, ExplicitVRLittleEndian)
    ae.add_requested_context(CR, BIG_ENDIAN)
    assert len(ae.requested_contexts) <= 128

    assoc = ae.associate("127.0.0.1", node.port, ae_title="PLEURA")
    try:
        assert assoc.is_established
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        rejected = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
    assert accepted == {(c, t) for c in ANALYSED_SOP_CLASSES for t in TRANSFER_SYNTAXES} | {
        (SEGMENTATION_SOP_CLASS, t) for t in TRANSFER_SYNTAXES if t in SEG_TRANSFER_SYNTAXES
    } | {(c, ExplicitVRLittleEndian) for c in others} | {(COMPREHENSIVE_SR, JPEGLSLossless)}
    # A Segmentation (sent back as a label) only in lossless syntaxes: its mask must stay exact.
    lossy_seg = {(SEGMENTATION_SOP_CLASS, t) for t in TRANSFER_SYNTAXES if t not in SEG_TRANSFER_SYNTAXES}
    assert lossy_seg and rejected == lossy_seg | {
        (PRIVATE_SOP_CLASS, ExplicitVRLittleEndian), (CR, BIG_ENDIAN)
    }


def test_deflated_transfer_syntax_is_stored_readable(node: Node) -> None:
    ds = crafted_cr()
    status = pynetdicom_store(node.port, ds, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert status.Status == 0x0000

    [instance] = node.ledger.list_instances(ds.StudyInstanceUID)
    assert instance.transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    stored = pydicom.dcmread(node.store.path(instance.storage_key))
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert (stored.SOPInstanceUID, stored.PatientID) == (ds.SOPInstanceUID, "TEST-1")


def test_missing_study_uid_is_refused_and_quarantined(node: Node, tmp_path: Path) -> None:
    ds = crafted_cr(StudyInstanceUID=None)
    path = tmp_path / "no-study.dcm"
    ds.save_as(path, enforce_file_format=True)

    sent = dicom_peers.storescu(node.port, [path], called_ae="PLEURA")

    assert "Received Store Response (Error: CannotUnderstand)" in sent.stderr, sent.stderr
    assert node.ledger.list_studies() == []
    [kept] = node.quarantined()
    assert pydicom.dcmread(kept).SOPInstanceUID == ds.SOPInstanceUID  # nothing lost
    reason = reason_file(kept).read_text()
    assert "Study Instance UID (0020,000D) is missing" in reason
    assert "calling AE: STORESCU" in reason


def test_missing_sop_instance_uid_is_refused_and_quarantined(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom sends a file as it is (from its file meta) in chunked mode, so the data set
    # can lack the SOP Instance UID that its file meta names.
    ds = crafted_cr(SOPInstanceUID=None)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "no-sop.dcm"
    ds.save_as(path, enforce_file_format=True)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    status = pynetdicom_store(node.port, path)

    assert 0xC000 <= status.Status <= 0xCFFF
    assert "SOP Instance UID" in status.ErrorComment
    [kept] = node.quarantined()
    assert "SOP Instance UID (0008,0018) is missing" in reason_file(kept).read_text()
    assert node.ledger.list_studies() == []


def test_a_data_set_of_another_sop_class_is_refused(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = crafted_cr(SOPClassUID=CT)  # the file meta (and so the context) still says CR
    path = tmp_path / "ct-as-cr.dcm"
    ds.preamble = b"\x00" * 128
    pydicom.dcmwrite(path, ds, enforce_file_format=False)  # keeps the file meta as it is
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    status = pynetdicom_store(node.port, path)

    assert status.Status == 0xA900
    [kept] = node.quarantined()
    assert f"SOP Class UID (0008,0016) {CT} does not match" in reason_file(kept).read_text()
    assert node.ledger.list_studies() == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_uid_is_refused(node: Node) -> None:
    status = pynetdicom_store(node.port, crafted_cr(SeriesInstanceUID="1.2.abc"))
    assert 0xC000 <= status.Status <= 0xCFFF
    assert "not a valid DICOM UID" in reason_file(node.quarantined()[0]).read_text()


def test_storage_failure_answers_out_of_resources_and_a_retry_succeeds(node: Node) -> None:
    blocker = node.settings.storage_dir / "instances"
    blocker.write_text("a file where the instances folder should be")
    ds = crafted_cr()

    status = pynetdicom_store(node.port, ds)
    assert status.Status == 0xA700
    assert node.ledger.list_studies() == []

    blocker.unlink()
    assert pynetdicom_store(node.port, ds).Status == 0x0000
    assert [i.sop_instance_uid for i in node.ledger.list_instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]


def test_ledger_failure_answers_out_of_resources(node: Node) -> None:
    with node.ledger.engine.begin() as connection:
        connection.execute(text("DROP TABLE instances"))

    status = pynetdicom_store(node.port, crafted_cr())

    assert status.Status == 0xA700


def test_the_receive_path_never_decodes_pixel_data(node: Node) -> None:
    """An instance whose pixel data no decoder can read is still accepted and stored byte for byte:
    the SCP reads headers only (decoding is the worker's job, which reports such an image)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = crafted_cr(Rows=64, Columns=64, BitsAllocated=16, BitsStored=12, HighBit=11, PixelRepresentation=0,
                    SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2")
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a JPEG 2000 code stream " * 4])
    ds["PixelData"].VR = "OB"
    with pytest.raises(Exception):  # the proof that the pixel data cannot be decoded
        _ = ds.pixel_array

    status = pynetdicom_store(node.port, ds, transfer_syntax=JPEG2000Lossless)
    assert status.Status == 0x0000
    [instance] = node.ledger.list_instances(ds.StudyInstanceUID)
    stored = pydicom.dcmread(node.store.path(instance.storage_key))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert stored.PixelData == ds.PixelData
    assert not node.quarantined()


def _identity_conflicts() -> float:
    """``pleura_identity_conflicts_total`` as the node's ``/metrics`` shows it (the SCP runs in this process)."""
    registry = CollectorRegistry()
    registry.register(IDENTITY_CONFLICTS)
    return registry.get_sample_value("pleura_identity_conflicts_total") or 0.0


def _audit_events(node: Node) -> list[dict]:
    import json

    trail = node.settings.storage_dir / "audit.jsonl"
    return [json.loads(line) for line in trail.read_text().splitlines()] if trail.exists() else []


def test_an_instance_uid_held_in_another_study_is_refused_quarantined_and_audited(node: Node) -> None:
    first = crafted_cr()
    assert pynetdicom_store(node.port, first).Status == 0x0000
    conflicts = _identity_conflicts()
    # The same SOP Instance UID under another study: acknowledging it would drop it silently.
    clash = crafted_cr(SOPInstanceUID=first.SOPInstanceUID, PatientID="TEST-1")
    status = pynetdicom_store(node.port, clash)
    assert status.Status == 0xC001 and "identity conflict" in status.ErrorComment
    assert node.ledger.list_instances(clash.StudyInstanceUID) == []
    assert [i.sop_instance_uid for i in node.ledger.list_instances(first.StudyInstanceUID)] == [first.SOPInstanceUID]
    [kept] = node.quarantined()
    assert pydicom.dcmread(kept).StudyInstanceUID == clash.StudyInstanceUID  # nothing lost
    assert "already received in another study" in reason_file(kept).read_text()
    [event] = [e for e in _audit_events(node) if e["event"] == "identity-conflict"]
    assert event["study_uid"] == clash.StudyInstanceUID and "another study" in event["reason"]
    assert _identity_conflicts() == conflicts + 1  # what the PACS team alerts on


def test_a_new_patient_id_under_a_known_study_is_refused_and_the_same_one_is_stored(node: Node) -> None:
    first = crafted_cr(PatientID="PAT-A")
    study = first.StudyInstanceUID
    assert pynetdicom_store(node.port, first).Status == 0x0000
    conflicts = _identity_conflicts()
    same = crafted_cr(StudyInstanceUID=study, PatientID="PAT-A")
    unnamed = crafted_cr(StudyInstanceUID=study, PatientID="")  # a modality that leaves it empty
    other = crafted_cr(StudyInstanceUID=study, PatientID="PAT-B")
    assert pynetdicom_store(node.port, same).Status == 0x0000
    assert pynetdicom_store(node.port, unnamed).Status == 0x0000
    status = pynetdicom_store(node.port, other)
    assert status.Status == 0xC001
    held = {i.sop_instance_uid for i in node.ledger.list_instances(study)}
    assert held == {first.SOPInstanceUID, same.SOPInstanceUID, unnamed.SOPInstanceUID}
    assert node.ledger.study_status(study)["patient_id"] == "PAT-A"
    [kept] = node.quarantined()
    assert "already held for another Patient ID" in reason_file(kept).read_text()
    assert [e["event"] for e in _audit_events(node)].count("identity-conflict") == 1
    assert _identity_conflicts() == conflicts + 1  # the same and the unnamed ones are no conflict
