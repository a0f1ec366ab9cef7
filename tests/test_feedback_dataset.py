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
from training.feedback_dataset import FEEDBACK_DATA_DIR, PROVENANCE_FILE, export_feedback_dataset, write_image
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


# --- the whole PS3.15 Annex E table, adversarially ---------------------------------------------

_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_KEPT_BY_OPTION = {"PatientSex", "PatientAge", "PatientSize", "PatientWeight"}  # Retain Patient Characteristics


def _adversarial_source() -> tuple[pydicom.Dataset, list[bytes]]:
    """A radiograph carrying a marker in every attribute of Table E.1-1 that holds text, a date or a
    UID (the table as the de-identification library ships it), in private tags and inside sequences."""
    from dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c import ALL_TAGS
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    ds, _ = synthetic_dicom(seed=5, positive=False, size=64)
    markers: list[bytes] = []

    def fill(target: pydicom.Dataset, tag: int, n: int) -> None:
        vr = dictionary_VR(tag).split(" or ")[0]
        if vr in _TEXT_VRS:
            value = f"MRK{n:04d}X"
            target.add_new(tag, vr, value)
            markers.append(value.encode())
        elif vr == "DA":
            value = f"1{n % 900 + 100:03d}0517"
            target.add_new(tag, vr, value)
            markers.append(value.encode())
        elif vr == "DT":
            value = f"1{n % 900 + 100:03d}0517134711"
            target.add_new(tag, vr, value)
            markers.append(value.encode())
        elif vr == "TM":
            value = f"13{n % 60:02d}17"
            target.add_new(tag, vr, value)
        elif vr == "UI":
            value = f"1.2.3.999.{n}.424242"
            target.add_new(tag, vr, value)
            markers.append(value.encode())
        elif vr == "SQ":
            item = pydicom.Dataset()
            item.PatientComments = f"SQMRK{n:04d}X"
            item.ReferencedSOPInstanceUID = f"1.2.3.888.{n}.424242"
            target.add_new(tag, vr, [item])
            markers.extend([f"SQMRK{n:04d}X".encode(), f"1.2.3.888.{n}.424242".encode()])
        elif vr in ("OB", "UN"):
            value = f"OBMRK{n:04d}".encode()
            target.add_new(tag, vr, value)
            markers.append(value)

    for n, tag in enumerate(ALL_TAGS):
        if len(tag) != 2 or tag[0] in (0x0002, 0x0000) or tag[0] >= 0x7FE0:
            continue
        tag_int = (tag[0] << 16) | tag[1]
        if keyword_for_tag(tag_int) in _KEPT_BY_OPTION | {"SOPClassUID", "PixelData"}:
            continue
        try:
            fill(ds, tag_int, n)
        except KeyError:  # a tag newer than pydicom's dictionary
            continue
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        markers.append(str(uid).encode())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = "MRKSRCAE"
    markers.append(b"MRKSRCAE")
    # The free text, private tags (top level and in a sequence), a nested identifier.
    ds.StudyComments = "Pt John Smith, MRN 12345, call wife 555-1234"
    ds.ReasonForTheRequestedProcedure = "fall at home, John Smith"
    ds.RequestedProcedureComments = "MRN 12345"
    markers += [b"John Smith", b"MRN 12345", b"555-1234"]
    block = ds.private_block(0x0029, "ACME MRK", create=True)
    block.add_new(0x01, "LO", "PRIVMRK1")
    nested = pydicom.Dataset()
    nested.private_block(0x0031, "ACME MRK", create=True).add_new(0x02, "LO", "PRIVMRK2")
    nested.PatientName = "NESTED^MRK"
    ds.ReferencedImageSequence = [nested]
    markers += [b"PRIVMRK1", b"PRIVMRK2", b"ACME MRK", b"NESTED^MRK"]
    ds.PatientID = "MRN-777"
    ds.PatientName = "SMITH^JOHN"
    markers += [b"MRN-777", b"SMITH^JOHN"]
    return ds, markers


@pytest.mark.parametrize("dates", ["remove", "shift"])
def test_no_identifier_of_the_confidentiality_profile_survives_in_the_bytes(tmp_path: Path, dates: str) -> None:
    ds, markers = _adversarial_source()
    assert len(markers) > 300  # the table's text, date and UID attributes, not a handful
    source = tmp_path / "source.dcm"
    ds.save_as(source, enforce_file_format=True)
    assert all(marker in source.read_bytes() for marker in markers[-12:])  # the source does carry them
    deidentifier = Deidentifier(b"k" * 32, dates=dates)
    out = write_image(deidentifier.apply(pydicom.dcmread(source)), tmp_path / "out")  # as the export writes it
    raw = out.read_bytes()
    survivors = [marker for marker in markers if marker in raw or marker.decode(errors="ignore") in str(out)]
    assert not survivors, survivors[:20]
    clean = pydicom.dcmread(out)
    assert clean.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in clean.DeidentificationMethodCodeSequence]
    assert codes[0] == "113100" and "113108" in codes
    assert ("113107" in codes) == (dates == "shift")
    assert not any(element.tag.is_private for element in clean.iterall())
    # UIDs consistent across a study: a second image of the same study gets the same study UID.
    ds.SOPInstanceUID = "1.2.3.999.77.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    again = deidentifier.apply(ds)
    assert again.StudyInstanceUID == clean.StudyInstanceUID and again.SOPInstanceUID != clean.SOPInstanceUID
    # The source is no valid radiograph (it holds attributes of every modality); de-identification
    # must add no error of its own to dciodvfy's verdict (but for the Clinical Trial Subject module's
    # committee name: the table replaces it (D) and removes the approval number it depends on).
    added = _dciodvfy_errors(out) - _dciodvfy_errors(source)
    assert not {line for line in added if "ClinicalTrialProtocolEthicsCommitteeName" not in line}, added


def _dciodvfy_errors(path: Path) -> set[str]:
    verdict = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return {line.split(" - <")[0].split(" = <")[0] for line in (verdict.stderr + verdict.stdout).splitlines()
            if line.startswith("Error") and "contains invalid data values" not in line}


def test_shifted_dates_keep_intervals_within_a_patient() -> None:
    ds, _ = synthetic_dicom(seed=6, positive=False, size=64)
    ds.PatientID = "MRN-1"
    ds.StudyDate, ds.ContentDate = "20240301", "20240303"
    deidentifier = Deidentifier(b"k" * 32, dates="shift")
    clean = deidentifier.apply(ds)
    assert clean.StudyDate != "20240301" and clean.StudyDate != "19000101"
    from datetime import date
    study, content = (date.fromisoformat(f"{v[:4]}-{v[4:6]}-{v[6:]}") for v in (clean.StudyDate, clean.ContentDate))
    assert (content - study).days == 2
    assert deidentifier.apply(ds).StudyDate == clean.StudyDate  # the same patient, the same shift
