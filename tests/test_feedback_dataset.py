"""The radiologists' feedback as a SIIM-ACR data set (`pleura dataset export-feedback`), optionally
de-identified, read back by the SIIM reader; merged with another set for `pleura train --from-feedback`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from pleura.cli import app
from test_training_archive import archive  # noqa: F401  (the labelled archive fixture)
from test_training_train import TINY_UNET
from contract.bundle import load_bundle
from training.datasets import merge_datasets, read_siim
from training.deidentify import Deidentifier
from training.feedback_dataset import FEEDBACK_DATA_DIR, PROVENANCE_FILE, export_feedback_dataset
from training.splits import make_splits
from training.synthetic import SYNTHETIC_PATIENT_NAME, synthetic_dicom


def _cli(monkeypatch: pytest.MonkeyPatch, storage: Path, *args: str):
    monkeypatch.delenv("PLEURA_DATABASE_URL", raising=False)
    monkeypatch.delenv("PLEURA_CONFIG", raising=False)
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(storage))
    return CliRunner().invoke(app, list(args))


def test_export_is_a_siim_set_with_the_feedback_labels(archive: dict, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    out = tmp_path / "feedback"
    exported = _cli(monkeypatch, archive["storage"], "dataset", "export-feedback", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    checked = CliRunner().invoke(app, ["dataset", "check", "--data", str(out), "--decode"])
    assert checked.exit_code == 0, checked.output
    data = read_siim(out)
    assert not data.problems and not data.unlabelled
    by_id = {example.image_id: example for example in data.examples}
    assert set(by_id) == set(archive["truths"]) | set(archive["negatives"])
    for sop_uid, truth in archive["truths"].items():
        np.testing.assert_array_equal(by_id[sop_uid].mask(), truth)
    assert not any(by_id[sop_uid].positive for sop_uid in archive["negatives"])
    assert all(example.synthetic for example in data.examples)  # still a demo set
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["images"] == len(by_id) and provenance["positives"] == len(archive["truths"])
    assert provenance["unlabelled_images_left_out"] == 1 and provenance["deidentified"] is False

    again = _cli(monkeypatch, archive["storage"], "dataset", "export-feedback", "--out", str(out))
    assert again.exit_code == 2 and "not an empty directory" in again.output


def test_deidentified_export_keeps_labels_and_patients_but_no_identifiers(
    archive: dict, tmp_path: Path, monkeypatch  # noqa: F811
) -> None:
    storage = tmp_path / "archive"
    shutil.copytree(archive["storage"], storage)
    plain = read_siim(export_feedback_dataset(storage, tmp_path / "plain").out)
    first = _cli(monkeypatch, storage, "dataset", "export-feedback", "--out", str(tmp_path / "a"), "--deidentify")
    assert first.exit_code == 0, first.output
    assert (storage / "deidentify.key").stat().st_mode & 0o077 == 0
    second = _cli(monkeypatch, storage, "dataset", "export-feedback", "--out", str(tmp_path / "b"), "--deidentify")
    assert second.exit_code == 0, second.output
    assert CliRunner().invoke(app, ["dataset", "check", "--data", str(tmp_path / "a")]).exit_code == 0

    anonymous = read_siim(tmp_path / "a")
    assert not anonymous.problems and not anonymous.unlabelled
    # The same key gives the same UIDs and pseudonyms in every export.
    assert sorted(e.image_id for e in anonymous.examples) == sorted(e.image_id for e in read_siim(tmp_path / "b").examples)
    originals = {e.image_id for e in plain.examples} | {e.patient_id for e in plain.examples}
    assert not originals & ({e.image_id for e in anonymous.examples} | {e.patient_id for e in anonymous.examples})
    # Labels survive: the same masks, matched through the pixel data (the UIDs changed).
    def by_pixels(index):
        return sorted((pydicom.dcmread(e.path).PixelData, e.positive, e.mask().tobytes()) for e in index.examples)
    assert by_pixels(anonymous) == by_pixels(plain)
    assert len({e.patient_id for e in anonymous.examples}) == len({e.patient_id for e in plain.examples})
    for example in anonymous.examples:
        ds = pydicom.dcmread(example.path)
        assert ds.PatientIdentityRemoved == "YES" and ds.PatientID.startswith("ANON-")
        assert ds.PatientName == SYNTHETIC_PATIENT_NAME and example.synthetic  # the demo marker is no identifier
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == example.image_id
        assert not ds.get("PatientBirthDate") and not ds.get("AccessionNumber") and ds.StudyDate == "19000101"
    assert json.loads((tmp_path / "a" / PROVENANCE_FILE).read_text())["deidentified"] is True
    verdict = subprocess.run(["dciodvfy", str(anonymous.examples[0].path)], capture_output=True, text=True)
    assert "Error" not in verdict.stderr + verdict.stdout, verdict.stderr


def test_deidentifier_removes_identifiers_everywhere_and_maps_uids_consistently() -> None:
    ds, _ = synthetic_dicom(seed=3, positive=False, size=64)
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN-123"
    ds.PatientBirthDate = "19700101"
    ds.InstitutionName = "St Elsewhere"
    ds.OperatorsName = "SMITH^TECH"
    ds.OtherPatientIDs = "OLD-9"
    ds.add_new(0x00091001, "LO", "private MRN-123")
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.SourceImageSequence = [reference]
    deidentifier = Deidentifier(b"k" * 32)
    clean = deidentifier.apply(ds)
    text = repr(clean) + repr(clean.file_meta)
    for identifier in ("DOE", "MRN-123", "19700101", "Elsewhere", "SMITH", "OLD-9", str(ds.SOPInstanceUID),
                       str(ds.StudyInstanceUID)):
        assert identifier not in text, identifier
    assert ds.PatientID == "MRN-123"  # the source is not changed
    assert clean.PatientName == clean.PatientID == deidentifier.pseudonym("MRN-123")
    assert clean.SourceImageSequence[0].ReferencedSOPInstanceUID == clean.SOPInstanceUID  # references follow
    assert clean.SOPClassUID == ds.SOPClassUID and clean.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert deidentifier.apply(ds).SOPInstanceUID == clean.SOPInstanceUID
    assert Deidentifier(b"x" * 32).apply(ds).SOPInstanceUID != clean.SOPInstanceUID
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(ValueError, match="Burned In Annotation"):
        deidentifier.apply(ds)


def test_merge_splits_patients_across_sets_and_keeps_the_later_label(archive: dict, synthetic_siim: Path) -> None:  # noqa: F811
    siim = read_siim(synthetic_siim)
    feedback = read_siim(export_feedback_dataset(archive["storage"], archive["storage"].parent / "merge-export").out)
    merged = merge_datasets([siim, feedback])
    assert merged.kind == "merged" and merged.has_masks
    assert len(merged.examples) == len(siim.examples) + len(feedback.examples)
    assignment = make_splits(merged.examples, (0.5, 0.25, 0.25), seed=0)
    splits_of: dict[str, set[str]] = {}
    for example in merged.examples:
        splits_of.setdefault(example.patient_id, set()).add(assignment[example.image_id])
    assert all(len(splits) == 1 for splits in splits_of.values())
    # The same image in both: kept once, with the later set's label, and the earlier copy reported.
    twice = merge_datasets([feedback, siim, feedback])
    assert len(twice.examples) == len(merged.examples)
    assert {e.image_id: e.path for e in twice.examples} == {e.image_id: e.path for e in merged.examples}
    assert len(twice.problems) == len(feedback.examples)


def test_train_from_feedback_and_a_data_set(archive: dict, synthetic_siim: Path, tiny_base_bundle: Path,  # noqa: F811
                                            tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    trained = _cli(
        monkeypatch, archive["storage"], "train", "--preset", "seg-unet-resnet18", "--data", str(synthetic_siim),
        "--from-feedback", "--out", str(run), "--base", str(tiny_base_bundle), "--epochs", "1", "--batch-size", "4",
        "--steps-per-epoch", "1", "--input-size", "64", "--set", json.dumps(TINY_UNET).join(["extra=", ""]),
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
    )
    assert trained.exit_code == 0, trained.output
    assert read_siim(run / FEEDBACK_DATA_DIR).examples
    bundle = load_bundle(run / "bundle")
    described = bundle.manifest.model_dump_json()
    assert str(synthetic_siim) in described and str(run / FEEDBACK_DATA_DIR) in described
    with (run / "splits.csv").open() as handle:
        assert sum(1 for _ in handle) - 1 == 24 + len(archive["truths"]) + len(archive["negatives"])
    nothing = CliRunner().invoke(app, ["train", "--preset", "seg-unet-resnet18", "--out", str(tmp_path / "x")])
    assert nothing.exit_code == 2 and "--from-feedback" in nothing.output


def test_an_export_that_stops_leaves_nothing_behind(archive: dict, tmp_path: Path) -> None:  # noqa: F811
    from training.datasets import DatasetError

    storage = tmp_path / "archive"
    shutil.copytree(archive["storage"], storage)
    victim = next((storage / "instances").rglob(f"{archive['rejected']}.dcm"))
    burned = pydicom.dcmread(victim)
    burned.BurnedInAnnotation = "YES"  # cannot be de-identified: found while writing
    burned.save_as(victim)
    with pytest.raises(DatasetError, match="Burned In Annotation"):
        export_feedback_dataset(storage, tmp_path / "out", deidentify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]
    skipped = export_feedback_dataset(storage, tmp_path / "out", deidentify=True, skip_bad=True)
    assert [problem.file.name for problem in skipped.problems] == [victim.name]
    assert len(read_siim(tmp_path / "out").examples) == skipped.images == len(skipped.archive.examples) - 1

    victim.write_bytes(b"not DICOM")  # found when the archive is read: named, nothing written
    with pytest.raises(DatasetError, match=archive["rejected"]):
        export_feedback_dataset(storage, tmp_path / "other")
    assert not (tmp_path / "other").exists()
