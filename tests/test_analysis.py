"""The worker's analysis of one study, in process: selection, reasons, results on shared storage."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import types
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from contract.messages import AnalysisSummary
from dicom_samples import dciodvfy_errors, pydicom_data_file
from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser, failed_summary


@pytest.fixture(scope="module")
def analyser(tmp_path_factory, demo_bundle):
    return StudyAnalyser.from_bundle_dir(tmp_path_factory.mktemp("storage"), demo_bundle, device="cpu")


def _store(analyser: StudyAnalyser, name: str, write) -> dict[str, str]:
    key = f"instances/study/series/{name}.dcm"
    path = analyser.storage_dir / key
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return {"sop_instance_uid": name, "key": key}


def _same_study(source: Path, study: pydicom.Dataset, sop_uid: str, target: Path) -> None:
    """Store a copy of ``source`` as an instance of ``study`` (the node groups instances by study)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.PatientID, ds.PatientName = study.StudyInstanceUID, study.PatientID, study.PatientName
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(target, enforce_file_format=True)


def test_a_study_with_a_chest_image_an_extremity_and_a_broken_file(analyser):
    positive, truth = synthetic_dicom(seed=77, positive=True, size=512)
    items = [
        _store(analyser, positive.SOPInstanceUID, lambda p: positive.save_as(p, enforce_file_format=True)),
        _store(analyser, "1.2.3.4", lambda p: _same_study(pydicom_data_file("RG3_UNCR.dcm"), positive, "1.2.3.4", p)),
        _store(analyser, "1.2.3.5", lambda p: p.write_bytes(b"not a DICOM file")),
    ]
    summary = analyser.analyse(positive.StudyInstanceUID, items)

    by_uid = {image["sop_instance_uid"]: image for image in summary["images"]}
    chest = by_uid[positive.SOPInstanceUID]
    assert chest["status"] == "analysed" and chest["flagged"] is True and chest["probability"] >= 0.5
    assert chest["area_cm2"] is not None and chest["area_px"] > 0
    assert by_uid["1.2.3.4"]["status"] == "not_analysed" and "EXTREMITY" in by_uid["1.2.3.4"]["reason"]
    assert by_uid["1.2.3.5"]["status"] == "failed"
    # The reason says what happened, in words: no storage key, path or UID.
    assert by_uid["1.2.3.5"]["reason"].startswith("the stored instance cannot be read (InvalidDicomError")
    assert "1.2.3.5" not in by_uid["1.2.3.5"]["reason"] and "/" not in by_uid["1.2.3.5"]["reason"]
    assert summary["flagged"] is True
    assert summary["model"]["synthetic_demo"] is True

    assert chest["side"] in ("left", "right") and chest["gap_mm"] > 0
    assert 0 < chest["hemithorax_fraction"] < 1

    # No destination set: every object kind; one SR for the whole analysis.
    kinds = sorted(result["kind"] for result in summary["results"])
    assert kinds == ["GSPS", "SC", "SEG", "SR"]
    for result in summary["results"]:
        path = analyser.storage_dir / result["key"]
        written = pydicom.dcmread(path)
        assert written.SOPInstanceUID == result["sop_instance_uid"]
        assert written.StudyInstanceUID == positive.StudyInstanceUID
        assert dciodvfy_errors(path) == []
    seg = next(r for r in summary["results"] if r["kind"] == "SEG")
    mask = pydicom.dcmread(analyser.storage_dir / seg["key"]).pixel_array.astype(bool)
    overlap = (mask & truth).sum() / max(1, (mask | truth).sum())
    assert overlap > 0.5, f"the synthetic pneumothorax was segmented poorly (IoU {overlap:.2f})"

    # The report says what happened to every image, the ones not analysed included.
    sr = hd.sr.srread(analyser.storage_dir / next(r for r in summary["results"] if r["kind"] == "SR")["key"])
    assert len(sr.content.get_planar_roi_measurement_groups()) == 1
    [extremity] = sr.content.get_image_measurement_groups()
    assert extremity.source_images[0].referenced_sop_instance_uid == "1.2.3.4"
    comments = [i.TextValue for i in sr.content[0].ContentSequence if i.ValueType == "TEXT"]
    assert any(c.startswith("Image 2 (series 1, instance 1) not analysed:") and "EXTREMITY" in c for c in comments)
    assert any(c.startswith("Image 3 (header unreadable) not analysed: the stored instance cannot be read")
               for c in comments)
    assert any(c.startswith("Image 1 (series 1, instance 1): Present: classifier") for c in comments)


def test_a_confident_classifier_with_too_small_an_area_is_absent_and_the_report_says_why(analyser, monkeypatch):
    """The issue's example: the classifier is well above its threshold but the segmented area is under
    the minimum; the image is Absent, and the SR, the summary's reason (the ledger's and the
    worklist's ``analysis_reason``) name the rule that decided."""
    positive, _ = synthetic_dicom(seed=80, positive=True, size=256)
    items = [_store(analyser, positive.SOPInstanceUID, lambda p: positive.save_as(p, enforce_file_format=True))]
    thresholds = analyser.models.manifest.thresholds.model_copy(update={"probability": 0.01, "min_area_px": 10**7})
    manifest = analyser.models.manifest.model_copy(update={"thresholds": thresholds})
    monkeypatch.setattr(analyser, "models", dataclasses.replace(analyser.models, manifest=manifest))
    summary = analyser.analyse(positive.StudyInstanceUID, items, {"objects": ["SR"]})

    [image] = AnalysisSummary.model_validate(summary).images
    assert image.analysis_status == "analysed" and image.flagged is False
    assert image.probability is not None and image.probability >= 0.01 and image.area_px > 0
    rule = re.fullmatch(
        r"classifier (\d\.\d+) >= threshold (0\.010\d*), but segmented area (\d+) px < minimum 10000000 px",
        image.analysis_reason or "",
    )
    assert rule, image.analysis_reason
    assert int(rule.group(3)) == image.area_px
    assert summary["flagged"] is False

    sr = hd.sr.srread(analyser.storage_dir / next(r for r in summary["results"] if r["kind"] == "SR")["key"])
    comments = [i.TextValue for i in sr.content[0].ContentSequence if i.ValueType == "TEXT"]
    [comment] = [c for c in comments if c.startswith("Image 1 ")]
    assert "Absent" in comment and image.analysis_reason in comment, comment


def test_the_objects_written_follow_the_options(analyser):
    positive, _ = synthetic_dicom(seed=79, positive=True, size=256)
    items = [_store(analyser, positive.SOPInstanceUID, lambda p: positive.save_as(p, enforce_file_format=True))]
    summary = analyser.analyse(positive.StudyInstanceUID, items, {"objects": ["SR", "SEG"], "sc_heatmap": False})
    assert sorted(r["kind"] for r in summary["results"]) == ["SEG", "SR"]
    summary = analyser.analyse(positive.StudyInstanceUID, items, {"objects": ["SR", "SC"], "sc_heatmap": True})
    assert sorted(r["kind"] for r in summary["results"]) == ["SC", "SEG", "SR"]  # the SEG: the SR references it


def test_a_study_with_nothing_to_analyse_still_gets_a_report(analyser):
    items = [_store(analyser, "1.2.3.9", lambda p: shutil.copy(pydicom_data_file("RG3_UNCR.dcm"), p))]
    summary = analyser.analyse("1.3.6.1.4.1.5962.1.2.11.20040826185059.5457", items)
    assert summary["images"][0]["status"] == "not_analysed" and summary["flagged"] is False
    [report] = summary["results"]
    assert report["kind"] == "SR" and report["source_sop_instance_uid"] is None
    assert dciodvfy_errors(analyser.storage_dir / report["key"]) == []


def test_analysing_again_rewrites_the_same_result_files(analyser):
    negative, _ = synthetic_dicom(seed=78, positive=False, size=512)
    items = [_store(analyser, negative.SOPInstanceUID, lambda p: negative.save_as(p, enforce_file_format=True))]
    first = analyser.analyse(negative.StudyInstanceUID, items)
    second = analyser.analyse(negative.StudyInstanceUID, items)
    assert [r["sop_instance_uid"] for r in first["results"]] == [r["sop_instance_uid"] for r in second["results"]]
    assert first["images"][0]["flagged"] is False


def test_analysing_again_writes_the_same_bytes_for_every_object(analyser, monkeypatch):
    """Same model, same images: the same SOP Instance UIDs *and* the same content, byte for byte
    (DICOM forbids two objects with one UID and different content). The creation date and time
    are those of the source study, not of the run, so nothing in the objects depends on when it
    ran: the second run is made a day later to prove it."""
    positive, _ = synthetic_dicom(seed=80, positive=True, size=256)
    items = [_store(analyser, positive.SOPInstanceUID, lambda p: positive.save_as(p, enforce_file_format=True))]
    first = analyser.analyse(positive.StudyInstanceUID, items)
    written = {r["kind"]: (analyser.storage_dir / r["key"]).read_bytes() for r in first["results"]}
    assert sorted(written) == ["GSPS", "SC", "SEG", "SR"]

    import datetime as real_datetime

    class _Tomorrow(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime.now(tz) + real_datetime.timedelta(days=1, hours=3)

    later = types.ModuleType("datetime")
    later.__dict__.update(vars(real_datetime))
    later.datetime = _Tomorrow
    for module in ("highdicom.base", "highdicom.base_content", "highdicom.sr.sop", "highdicom.sc.sop",
                   "highdicom.pr.content"):
        monkeypatch.setattr(f"{module}.datetime", later)
    second = analyser.analyse(positive.StudyInstanceUID, items)
    again = {r["kind"]: (analyser.storage_dir / r["key"]).read_bytes() for r in second["results"]}
    differing = {
        kind: _differences(pydicom.dcmread(io.BytesIO(written[kind])), pydicom.dcmread(io.BytesIO(again[kind])))
        for kind in written
    }
    assert differing == {kind: [] for kind in written}  # names the elements that differ
    assert all(written[kind] == again[kind] for kind in written)


def _differences(a: pydicom.Dataset, b: pydicom.Dataset, path: str = "") -> list[str]:
    """The elements (by path) whose values differ between ``a`` and ``b``."""
    found = []
    for tag in sorted(set(a.keys()) | set(b.keys())):
        name = f"{path}{pydicom.datadict.keyword_for_tag(tag) or tag}"
        if tag not in a or tag not in b:
            found.append(name)
        elif a[tag].VR == "SQ":
            if len(a[tag].value) != len(b[tag].value):
                found.append(name)
            for index, (x, y) in enumerate(zip(a[tag].value, b[tag].value)):
                found.extend(_differences(x, y, f"{name}[{index}]."))
        elif a[tag].value != b[tag].value:
            found.append(name)
    return found


def test_failed_summary_names_the_reason_for_every_instance():
    summary = failed_summary("1.2", [{"sop_instance_uid": "1.2.3", "key": "k"}], "analysis failed: boom")
    assert summary["images"][0]["status"] == "failed" and summary["images"][0]["reason"].endswith("boom")
    assert summary["results"] == [] and summary["flagged"] is False


def test_one_image_whose_results_cannot_be_written_fails_alone(analyser, monkeypatch):
    import worker.image_jobs as analysis  # where the per-image objects are built (in process and in the pool)

    first, _ = synthetic_dicom(seed=80, positive=True, size=256)
    second, _ = synthetic_dicom(seed=81, positive=False, size=256)
    second.StudyInstanceUID = first.StudyInstanceUID
    items = [
        _store(analyser, ds.SOPInstanceUID, lambda p, ds=ds: ds.save_as(p, enforce_file_format=True))
        for ds in (first, second)
    ]
    real_build_seg = analysis.build_seg

    def failing_for_first(source, finding, model):
        if source.SOPInstanceUID == first.SOPInstanceUID:
            raise ValueError("cannot encode this mask")
        return real_build_seg(source, finding, model)

    monkeypatch.setattr(analysis, "build_seg", failing_for_first)
    summary = analyser.analyse(first.StudyInstanceUID, items)
    by_uid = {image["sop_instance_uid"]: image for image in summary["images"]}
    assert by_uid[first.SOPInstanceUID]["status"] == "failed"
    assert "cannot encode this mask" in by_uid[first.SOPInstanceUID]["reason"]
    assert by_uid[second.SOPInstanceUID]["status"] == "analysed"
    per_image = [r for r in summary["results"] if r["kind"] != "SR"]
    assert {r["source_sop_instance_uid"] for r in per_image} == {second.SOPInstanceUID}
    [report] = [r for r in summary["results"] if r["kind"] == "SR"]
    comments = [i.TextValue for i in pydicom.dcmread(analyser.storage_dir / report["key"]).ContentSequence
                if i.ValueType == "TEXT"]
    assert any(c.startswith("Image 2 (") and "cannot encode this mask" in c for c in comments)
    assert not any(first.SOPInstanceUID in c for c in comments)


def test_pixel_data_that_does_not_match_its_header_is_reported_not_analysed(analyser):
    """The node stores such an instance (it never decodes pixel data on receipt); the analysis
    says why it could not read it, and the report says so too."""
    broken, _ = synthetic_dicom(seed=83, positive=True, size=256)
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]  # fewer bytes than rows x columns x bits
    items = [_store(analyser, broken.SOPInstanceUID, lambda p: broken.save_as(p, enforce_file_format=True))]
    summary = analyser.analyse(broken.StudyInstanceUID, items)
    [image] = summary["images"]
    assert image["status"] == "not_analysed" and image["reason"].startswith("unreadable image")
    [report] = summary["results"]
    comments = [i.TextValue for i in pydicom.dcmread(analyser.storage_dir / report["key"]).ContentSequence
                if i.ValueType == "TEXT"]
    assert any("not analysed: unreadable image" in c for c in comments)


def test_a_study_that_crashed_its_worker_gets_a_not_analysed_report_of_its_own(analyser):
    """The node's third dispatch of a study that killed its worker twice (node/ledger/leases.py):
    the report names every image not analysed, with the reason, under a UID of its own (the
    analysis of the same images by the same model is another object), and no network runs."""
    positive, _ = synthetic_dicom(seed=81, positive=True, size=256)
    items = [_store(analyser, positive.SOPInstanceUID, lambda p: positive.save_as(p, enforce_file_format=True))]
    reason = "the analysis crashed twice (its worker process ended while analysing this study); not retried"
    crashed = analyser.analyse(positive.StudyInstanceUID, items, {"not_analysed_reason": reason})
    [image] = crashed["images"]
    assert image["status"] == "not_analysed" and image["reason"] == reason and image["probability"] is None
    assert crashed["flagged"] is False
    [report] = crashed["results"]
    assert report["kind"] == "SR"
    path = analyser.storage_dir / report["key"]
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    comments = [i.TextValue for i in sr.content[0].ContentSequence if i.ValueType == "TEXT"]
    assert any(c.startswith("Image 1 (series 1, instance 1) not analysed: the analysis crashed twice") for c in comments)
    assert not sr.content.get_planar_roi_measurement_groups()

    analysed = analyser.analyse(positive.StudyInstanceUID, items)
    report_uids = {r["sop_instance_uid"] for r in analysed["results"] if r["kind"] == "SR"}
    assert report["sop_instance_uid"] not in report_uids
