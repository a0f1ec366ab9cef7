"""Segmentations sent back to Pleura (DCMTK storescu as the PACS): stored, never analysed, and
recorded as radiologists' labels that the feedback export and the archive reader use; Pleura's own
SEG coming back labels nothing; a malformed SEG is refused with a status and kept aside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

import dicom_peers
from node.storage import reason_file
from seg_fixtures import radiologist_seg, save, store_image
from scp_node import Node
from test_node_scp import pynetdicom_store
from contract.bundle import ModelIdentity
from training.archive import read_archive
from training.synthetic import synthetic_dicom
from worker.inference.result import ImageFinding
from worker.writers.seg import build_seg

SEG_CLASS = pydicom.uid.SegmentationStorage
MODEL = ModelIdentity(name="pleura-demo", version="0.1.0-demo", manufacturer="Pleura", synthetic_demo=True,
                      intended_use="test")


def analysed(node: Node, seed: int, positive: bool, seg: pydicom.Dataset | None = None):
    """A synthetic image received and analysed, as the node records it: flagged with the
    result ``seg`` (stored under results/) when one is given, else not flagged."""
    ds, truth = synthetic_dicom(seed=seed, positive=positive, size=96)
    store_image(node.ledger, node.store, ds)
    results = []
    if seg is not None:
        key = f"results/{ds.StudyInstanceUID}/{seg.SOPInstanceUID}.dcm"
        save(seg, node.store.path(key))
        results.append({"kind": "SEG", "key": key, "sop_instance_uid": seg.SOPInstanceUID,
                        "sop_class_uid": seg.SOPClassUID, "source_sop_instance_uid": ds.SOPInstanceUID})
    node.ledger.mark_queued(ds.StudyInstanceUID)
    node.ledger.record_analysis({
        "study_uid": ds.StudyInstanceUID, "model": {"name": MODEL.name, "version": MODEL.version},
        "images": [{"sop_instance_uid": ds.SOPInstanceUID, "status": "analysed", "probability": 0.1,
                    "flagged": seg is not None}],
        "results": results, "flagged": seg is not None,
    })
    return ds, truth


def test_a_radiologists_seg_becomes_a_label_and_is_never_analysed(node: Node, tmp_path: Path) -> None:
    missed, truth = analysed(node, 1, True)
    clear, _ = analysed(node, 2, False)
    outline = save(radiologist_seg([missed], [truth]), tmp_path / "outline.dcm")
    empty = save(radiologist_seg([clear], [np.zeros((96, 96), bool)]), tmp_path / "empty.dcm")

    # -R: propose the files' own SOP class (storescu's default list has no Segmentation Storage).
    sent = dicom_peers.storescu(node.port, [outline, empty], called_ae="PLEURA", calling_ae="READING1",
                                options=["-R"])
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.count("Received Store Response (Success)") == 2

    # Stored durably like an instance, but not one: nothing to analyse, the studies stay done.
    for path in (outline, empty):
        seg = pydicom.dcmread(path)
        stored = node.store.path(node.store.instance_key(seg.StudyInstanceUID, seg.SeriesInstanceUID,
                                                         seg.SOPInstanceUID))
        kept = pydicom.dcmread(stored)
        assert (kept.SOPInstanceUID, kept.PixelData) == (seg.SOPInstanceUID, seg.PixelData)
    for ds in (missed, clear):
        assert node.ledger.study_status(ds.StudyInstanceUID)["status"] == "done"
        assert [i.sop_instance_uid for i in node.ledger.list_instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]
    assert node.ledger.due_studies(settle_seconds=0) == []

    exported = {study["study_uid"]: study for study in node.ledger.feedback_export()}
    outlined = exported[missed.StudyInstanceUID]
    assert (outlined["verdict"], outlined["user"], outlined["label"]) == ("corrected", "READING1", 1)
    (image,) = outlined["images"]
    assert (image["label"], image["labelled_by"]) == (1, "READING1")
    assert image["seg_key"].endswith(f"{pydicom.dcmread(outline).SOPInstanceUID}.dcm")
    assert exported[clear.StudyInstanceUID]["label"] == 0
    assert exported[clear.StudyInstanceUID]["images"][0]["label"] == 0

    data = read_archive(node.settings.storage_dir)
    by_id = {example.image_id: example for example in data.examples}
    assert by_id[missed.SOPInstanceUID].positive
    np.testing.assert_array_equal(by_id[missed.SOPInstanceUID].mask(), truth)
    assert not by_id[clear.SOPInstanceUID].positive

    # The same SEG again: acknowledged, nothing new.
    again = dicom_peers.storescu(node.port, [outline], called_ae="PLEURA", calling_ae="READING2", options=["-R"])
    assert again.returncode == 0, again.stderr
    assert node.ledger.feedback_export()[0]["user"] == "READING1"


def test_a_later_seg_overrides_an_older_verdict_and_vice_versa(node: Node, tmp_path: Path) -> None:
    ds, truth = analysed(node, 3, True)
    node.ledger.record_feedback(ds.StudyInstanceUID, "rejected", "dr.a")
    outline = save(radiologist_seg([ds], [truth]), tmp_path / "outline.dcm")
    assert pynetdicom_store(node.port, outline, SEG_CLASS).Status == 0x0000
    (study,) = node.ledger.feedback_export()
    assert study["verdict"] == "rejected" and study["label"] == 1  # the outline is newer
    assert study["images"][0]["label"] == 1 and study["images"][0]["labelled_by"] == "CRAFTED"
    node.ledger.record_feedback(ds.StudyInstanceUID, "rejected", "dr.b")
    (study,) = node.ledger.feedback_export()
    assert study["label"] == 0 and study["images"][0]["label"] == 0 and study["images"][0]["labelled_by"] == "dr.b"


def test_pleuras_own_seg_coming_back_is_not_a_label(node: Node, tmp_path: Path) -> None:
    source, truth = synthetic_dicom(seed=4, positive=True, size=96)
    own = build_seg(source, ImageFinding(0.9, 0.5, True, truth, int(truth.sum()), None), MODEL)
    analysed(node, 4, True, seg=own)
    # As written (the ledger knows its UID), and re-identified by a PACS (a new UID, same maker).
    reuided = pydicom.dcmread(save(own, tmp_path / "own.dcm"))
    reuided.SOPInstanceUID = reuided.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    sent = dicom_peers.storescu(node.port, [tmp_path / "own.dcm", save(reuided, tmp_path / "reuided.dcm")],
                                called_ae="PLEURA", options=["-R"])
    assert sent.returncode == 0, sent.stderr
    assert node.ledger.feedback_export() == []
    assert not (node.settings.storage_dir / "instances" / source.StudyInstanceUID / own.SeriesInstanceUID).exists()
    assert node.ledger.study_status(source.StudyInstanceUID)["status"] == "done"


def test_a_seg_of_something_else_is_kept_but_labels_nothing(node: Node, tmp_path: Path) -> None:
    ds, truth = analysed(node, 5, True)
    lung = radiologist_seg([ds], [truth], label="Lung", property_type=codes.SCT.Lung)
    assert pynetdicom_store(node.port, lung, SEG_CLASS).Status == 0x0000
    assert node.store.path(node.store.instance_key(lung.StudyInstanceUID, lung.SeriesInstanceUID,
                                                   lung.SOPInstanceUID)).is_file()
    assert node.ledger.feedback_export() == []


def test_a_malformed_seg_is_refused_and_kept_aside(node: Node) -> None:
    ds, truth = analysed(node, 6, True)
    seg = radiologist_seg([ds], [truth])
    del seg.SegmentSequence  # Type 1 in the Segmentation Image module
    status = pynetdicom_store(node.port, seg, SEG_CLASS)
    assert status.Status == 0xA900
    assert "SEG" in str(status.ErrorComment)
    (kept,) = node.quarantined()
    assert pydicom.dcmread(kept).SOPInstanceUID == seg.SOPInstanceUID
    assert "Segmentation" in reason_file(kept).read_text()

    unreferenced = radiologist_seg([ds], [truth])
    del unreferenced.ReferencedSeriesSequence
    for frame in unreferenced.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    assert pynetdicom_store(node.port, unreferenced, SEG_CLASS).Status == 0xA900
    assert len(node.quarantined()) == 2
    assert "references no image" in reason_file(node.quarantined()[-1]).read_text()
    assert node.ledger.feedback_export() == []


def test_the_node_reads_segmentations_without_loading_torch() -> None:
    import subprocess
    import sys

    check = "import sys, node.scp, node.seg_labels; assert 'torch' not in sys.modules, 'torch imported'"
    ran = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert ran.returncode == 0, ran.stderr
