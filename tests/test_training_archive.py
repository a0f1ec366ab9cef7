"""Pleura's own archive as training data: studies the node stored, labelled by radiologists'
feedback (confirmed with Pleura's SEG, rejected, corrected with a drawn outline), and a few
training steps on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from node.ledger import Ledger
from node.storage import InstanceStore
from test_training_train import _tiny
from contract.bundle import ModelIdentity, load_bundle
from training.datasets import DatasetError, read_dataset
from training.synthetic import synthetic_dicom
from training.trainer import train
from worker.image_jobs import write_result
from worker.inference.result import ImageFinding
from worker.writers.seg import build_seg

MODEL = ModelIdentity(name="pleura-demo", version="0.1.0-demo", manufacturer="Pleura", synthetic_demo=True,
                      intended_use="test")


def _store(ledger: Ledger, store: InstanceStore, seed: int, positive: bool, *, flagged: bool, study: str | None = None):
    ds, truth = synthetic_dicom(seed=seed, positive=positive, size=96)
    if study is not None:
        ds.StudyInstanceUID = study
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    key = store.write_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
    ledger.record_instance(sop_instance_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                           series_instance_uid=ds.SeriesInstanceUID, sop_class_uid=ds.SOPClassUID,
                           transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, storage_key=key,
                           patient_id=ds.PatientID)
    results = []
    if flagged:
        finding = ImageFinding(0.9, 0.5, True, truth, int(truth.sum()), None)
        seg = build_seg(ds, finding, MODEL)
        seg_key = f"results/{ds.StudyInstanceUID}/{seg.SOPInstanceUID}.dcm"
        write_result(seg, store.path(seg_key))
        results.append({"kind": "SEG", "key": seg_key, "sop_instance_uid": seg.SOPInstanceUID,
                        "sop_class_uid": seg.SOPClassUID, "source_sop_instance_uid": ds.SOPInstanceUID})
    return ds, truth, results


def _analysed(ledger: Ledger, study: str, images: list[tuple], results: list[dict]) -> None:
    ledger.mark_queued(study)
    ledger.record_analysis({
        "study_uid": study, "model": {"name": "pleura-demo", "version": "0.1.0-demo", "synthetic_demo": True},
        "images": [{"sop_instance_uid": ds.SOPInstanceUID, "status": "analysed", "probability": 0.9 if flagged else 0.1,
                    "flagged": flagged, "area_px": 1, "area_cm2": None} for ds, flagged in images],
        "results": results, "flagged": any(flagged for _, flagged in images),
    })


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    storage = tmp_path_factory.mktemp("archive")
    ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
    store = InstanceStore(storage)
    truths = {}
    # Confirmed: a flagged image (outlined by Pleura's SEG) and an unflagged one the feedback says nothing about.
    confirmed, truth, results = _store(ledger, store, 1, True, flagged=True)
    quiet, _, _ = _store(ledger, store, 2, False, flagged=False, study=confirmed.StudyInstanceUID)
    _analysed(ledger, confirmed.StudyInstanceUID, [(confirmed, True), (quiet, False)], results)
    ledger.record_feedback(confirmed.StudyInstanceUID, "confirmed", "dr.a")
    truths[confirmed.SOPInstanceUID] = truth
    # Rejected: a flag the radiologist did not agree with.
    rejected, _, results = _store(ledger, store, 3, False, flagged=True)
    _analysed(ledger, rejected.StudyInstanceUID, [(rejected, True)], results)
    ledger.record_feedback(rejected.StudyInstanceUID, "rejected", "dr.b")
    # Corrected: missed by the model, outlined by the radiologist.
    missed, truth, _ = _store(ledger, store, 4, True, flagged=False)
    _analysed(ledger, missed.StudyInstanceUID, [(missed, False)], [])
    mask_key = "feedback/x/1.png"
    store.path(mask_key).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((truth * 255).astype(np.uint8)).save(store.path(mask_key))
    ledger.record_feedback(missed.StudyInstanceUID, "corrected", "dr.c", sop_instance_uid=missed.SOPInstanceUID,
                           mask_key=mask_key)
    truths[missed.SOPInstanceUID] = truth
    # More of the same, so that a split has something in each part.
    negatives = [rejected.SOPInstanceUID]
    for seed in range(10, 16):
        positive = seed % 2 == 0
        ds, truth, results = _store(ledger, store, seed, positive, flagged=True)
        _analysed(ledger, ds.StudyInstanceUID, [(ds, True)], results)
        ledger.record_feedback(ds.StudyInstanceUID, "confirmed" if positive else "rejected", "dr.d")
        if positive:
            truths[ds.SOPInstanceUID] = truth
        else:
            negatives.append(ds.SOPInstanceUID)
    ledger.close()
    return {"storage": storage, "truths": truths, "negatives": negatives, "rejected": rejected.SOPInstanceUID,
            "quiet": quiet}


def test_feedback_labels_the_archive(archive: dict) -> None:
    data = read_dataset(archive["storage"])
    assert data.kind == "archive" and data.has_masks
    by_id = {example.image_id: example for example in data.examples}
    assert set(by_id) == set(archive["truths"]) | set(archive["negatives"])
    for sop_uid, truth in archive["truths"].items():
        assert by_id[sop_uid].positive
        np.testing.assert_array_equal(by_id[sop_uid].mask(), truth)  # Pleura's SEG, or the drawn outline
    for sop_uid in archive["negatives"]:
        assert not by_id[sop_uid].positive and not by_id[sop_uid].mask().any()
    assert [p.name for p in data.unlabelled] == [f"{archive['quiet'].SOPInstanceUID}.dcm"]
    assert all(example.synthetic for example in data.examples)


def test_a_missing_file_names_the_file_or_is_skipped(archive: dict, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(archive["storage"], copy)
    victim = next((copy / "instances").rglob(f"{archive['rejected']}.dcm"))
    victim.unlink()
    with pytest.raises(DatasetError, match=archive["rejected"]):
        read_dataset(copy)
    skipped = read_dataset(copy, skip_bad=True)
    assert len(skipped.examples) == len(archive["truths"]) + len(archive["negatives"]) - 1
    assert [problem.file.name for problem in skipped.problems] == [f"{archive['rejected']}.dcm"]


def test_a_unet_trains_on_the_archive(archive: dict, tiny_base_bundle: Path, tmp_path: Path) -> None:
    preset = _tiny("seg-unet-resnet18", epochs=1, steps_per_epoch=1, batch_size=2, positives_only=False)
    train(preset, read_dataset(archive["storage"]), tmp_path / "run", base=load_bundle(tiny_base_bundle),
          fractions=(0.5, 0.25, 0.25), cache_root=tmp_path / "cache", device="cpu", progress=False)
    bundle = load_bundle(tmp_path / "run" / "bundle")
    assert bundle.manifest.synthetic_demo  # trained on synthetic images: a demo, and it says so
    assert "Pleura's archive labelled by radiologists' feedback" in bundle.manifest.model_dump_json()
