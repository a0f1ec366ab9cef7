"""No file path and no UID in the free text of any object Pleura writes (tests/result_text.py).

Reasons and comments reach the PACS, the worklist and the RIS: they say what happened in words.
This module runs last (its name sorts last), so besides the objects it makes itself it reads every
result object the suite wrote before it, in this process or in the nodes and workers the tests
started, wherever under the session's temporary directory they were written. Under pytest-xdist
that is this worker's share; conftest.py reads every worker's at the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_samples import lateral_chest_pixels, pydicom_data_file, synthetic_radiograph
from result_text import PATH, UID, offending_texts, pleura_results
from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser


@pytest.fixture(scope="module")
def a_study_of_every_outcome(tmp_path_factory, demo_bundle) -> list[Path]:
    """A study with a flagged, a negative, a lateral, an extremity, an unreadable and a broken image."""
    storage = tmp_path_factory.mktemp("result-text")
    analyser = StudyAnalyser.from_bundle_dir(storage, demo_bundle, device="cpu")
    positive, _ = synthetic_dicom(seed=77, positive=True, size=256)
    study = positive.StudyInstanceUID
    negative, _ = synthetic_dicom(seed=78, positive=False, size=256)
    lateral = synthetic_radiograph(study_instance_uid=study, seed=3)
    del lateral.ViewPosition, lateral.ViewCodeSequence, lateral.SeriesDescription, lateral.StudyDescription
    lateral.PixelData = lateral_chest_pixels(int(lateral.Rows), int(lateral.Columns)).tobytes()
    extremity = pydicom.dcmread(pydicom_data_file("RG3_UNCR.dcm"))
    truncated, _ = synthetic_dicom(seed=79, positive=True, size=256)
    truncated.PixelData = truncated.PixelData[:100]
    items = []
    for name, ds in (("pos", positive), ("neg", negative), ("lat", lateral), ("ext", extremity), ("trunc", truncated)):
        ds.StudyInstanceUID = study
        key = f"instances/{study}/{name}.dcm"
        (storage / key).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(storage / key, enforce_file_format=True)
        items.append({"sop_instance_uid": str(ds.SOPInstanceUID), "key": key})
    broken_key = f"instances/{study}/broken.dcm"
    (storage / broken_key).write_bytes(b"not a DICOM file")
    items.append({"sop_instance_uid": "1.2.826.0.1.3680043.8.498.99", "key": broken_key})
    summary = analyser.analyse(study, items)
    reasons = [image["reason"] for image in summary["images"] if image["reason"]]
    assert len(reasons) == 6  # every image says why it was (or was not) flagged or analysed
    for reason in reasons:
        assert not PATH.search(reason) and not UID.search(reason), reason
    return [storage / result["key"] for result in summary["results"]]


def test_the_objects_of_every_outcome_carry_no_path_or_uid_in_text(a_study_of_every_outcome):
    assert {pydicom.dcmread(p).Modality for p in a_study_of_every_outcome} >= {"SR", "SEG", "PR", "OT"}
    problems = [problem for path in a_study_of_every_outcome for problem in offending_texts(path)]
    assert problems == []


def test_every_object_the_suite_wrote_carries_no_path_or_uid_in_text(tmp_path_factory, a_study_of_every_outcome):
    written = pleura_results(tmp_path_factory.getbasetemp())
    assert len(written) >= len(a_study_of_every_outcome)
    problems = [problem for path in written for problem in offending_texts(path)]
    assert problems == [], f"{len(problems)} text values with a path or UID, e.g. {problems[:5]}"


def test_the_check_finds_a_path_and_a_uid(tmp_path):
    ds = synthetic_radiograph()
    ds.ImageComments = "not analysed: cannot read /srv/pleura/store/instances/1/2/3.dcm"
    ds.DerivationDescription = "image 1.2.826.0.1.3680043.8.498.12345 was skipped"
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert len(offending_texts(path)) == 2
