"""Which images are analysed: sites' own words for the chest and the view, view codes, descriptions,
and the picture itself when no header tells the view."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from config.settings import load_settings
from dicom_samples import lateral_chest_pixels, pydicom_data_file, synthetic_radiograph
from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph
from worker.analysis import StudyAnalyser
from worker.inference.select import Vocabulary, assess, looks_frontal


def _header(**attributes) -> Dataset:
    ds = Dataset()
    values = {"Modality": "CR", "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"}
    values.update(attributes)
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(
    "body_part", ["CHEST", "THORAX", "PORT CHEST", "CHEST PA", "TORAX", "THORAX AP", "Chest", "LUNG"]
)
def test_sites_words_for_the_chest_are_chest(body_part):
    assert assess(_header(BodyPartExamined=body_part, ViewPosition="PA")).reason is None


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"BodyPartExamined": "THORACIC SPINE"}, "body part THORACIC SPINE is not chest"),
        ({"BodyPartExamined": "CHEST RIBS"}, "body part CHEST RIBS is not chest"),
        ({"BodyPartExamined": "ABDOMEN"}, "body part ABDOMEN is not chest"),
        ({"StudyDescription": "XR L-SPINE AP"}, "the study description names SPINE, not chest"),
        ({"SeriesDescription": "Knee AP"}, "the series description names KNEE, not chest"),
    ],
)
def test_other_body_parts_say_why(attributes, reason):
    assert reason in (assess(_header(**attributes)).reason or "")


def test_descriptions_stand_in_for_an_absent_body_part():
    assert assess(_header(StudyDescription="XR CHEST 1 VIEW", ViewPosition="AP")).reason is None
    assert assess(_header(ProtocolName="Thorax p.a.", ViewPosition="PA")).reason is None


@pytest.mark.parametrize(
    ("attributes", "decision"),
    [
        ({"ViewPosition": "PA"}, "frontal"),
        ({"ViewPosition": "LL"}, "lateral"),
        ({"ViewPosition": "LLO"}, "other"),
        ({"ViewCodeSequence": [_code("399348003", "antero-posterior")]}, "frontal"),
        ({"ViewCodeSequence": [_code("399067008", "lateral")]}, "lateral"),
        ({"ViewCodeSequence": [_code("R-10214", "postero-anterior", "SRT")]}, "frontal"),  # legacy code, read by meaning
        ({"SeriesDescription": "Chest LAT"}, "lateral"),
        ({"SeriesDescription": "PA erect"}, "frontal"),
        ({"ProtocolName": "THORAX AP PORTABLE"}, "frontal"),
        # A study of two views names both: its description decides nothing, the series' does.
        ({"StudyDescription": "CHEST PA AND LATERAL"}, "unknown"),
        ({"StudyDescription": "CHEST PA AND LATERAL", "SeriesDescription": "LATERAL"}, "lateral"),
        ({}, "unknown"),
    ],
)
def test_the_view_comes_from_the_first_attribute_that_names_one(attributes, decision):
    found = assess(_header(BodyPartExamined="CHEST", **attributes))
    if decision == "frontal":
        assert found.reason is None and found.view_known
    elif decision == "unknown":
        assert found.reason is None and not found.view_known
    elif decision == "lateral":
        assert found.reason is not None and found.reason.startswith("lateral view")
    else:
        assert found.reason is not None and "not a frontal view" in found.reason


def test_dx_for_processing_is_not_analysed_and_says_why():
    reason = assess(_header(Modality="DX", PresentationIntentType="FOR PROCESSING", BodyPartExamined="CHEST")).reason
    assert reason is not None and "For Processing" in reason


@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image Storage - For Processing
    ],
)
def test_a_for_processing_sop_class_is_not_analysed_without_presentation_intent_type(sop_class):
    """The SOP class alone says For Processing: a sender that leaves out Presentation Intent Type
    does not get its raw detector data analysed."""
    header = _header(Modality="DX", SOPClassUID=sop_class, BodyPartExamined="CHEST", ViewPosition="PA")
    reason = assess(header).reason
    assert reason is not None and "For Processing" in reason
    for_presentation = _header(
        Modality="DX", SOPClassUID="1.2.840.10008.5.1.4.1.1.1.1", BodyPartExamined="CHEST", ViewPosition="PA"
    )
    assert assess(for_presentation).reason is None


def test_a_site_vocabulary_comes_from_the_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(tmp_path))
    monkeypatch.setenv("PLEURA_CHEST_BODY_PARTS", '["BRYST", "CHEST"]')
    monkeypatch.setenv("PLEURA_LATERAL_VIEW_TERMS", '["SIDE"]')
    words = Vocabulary.from_settings(load_settings())
    assert assess(_header(BodyPartExamined="BRYST", ViewPosition="PA"), words).reason is None
    assert assess(_header(BodyPartExamined="BRYST", ViewPosition="PA")).reason == "body part BRYST is not chest"
    assert assess(_header(BodyPartExamined="CHEST", SeriesDescription="side"), words).reason.startswith("lateral")


def test_the_picture_tells_a_frontal_chest_from_a_lateral():
    rg1 = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))  # a real PA chest (CR)
    assert looks_frontal(decode_radiograph(rg1, Preprocessing()))
    lateral = lateral_chest_pixels(seed=5).astype(np.float32) / 4095
    assert not looks_frontal(lateral)
    assert not looks_frontal(np.zeros((64, 64), dtype=np.float32))


@pytest.fixture(scope="module")
def analyser(tmp_path_factory, demo_bundle):
    return StudyAnalyser.from_bundle_dir(tmp_path_factory.mktemp("eligibility"), demo_bundle, device="cpu")


def _without_view(ds: Dataset) -> Dataset:
    for keyword in ("ViewPosition", "ViewCodeSequence", "SeriesDescription", "StudyDescription", "ProtocolName"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def test_a_lateral_without_view_position_is_not_read_as_frontal(analyser):
    frontal = _without_view(synthetic_radiograph(seed=11))
    lateral = _without_view(synthetic_radiograph(study_instance_uid=frontal.StudyInstanceUID, seed=12))
    lateral.PixelData = lateral_chest_pixels(int(lateral.Rows), int(lateral.Columns), seed=12).tobytes()
    real = _without_view(pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm")))
    real.StudyInstanceUID = frontal.StudyInstanceUID
    items = []
    for name, ds in (("frontal", frontal), ("lateral", lateral), ("real", real)):
        key = f"instances/eligibility/{name}.dcm"
        path = analyser.storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        items.append({"sop_instance_uid": str(ds.SOPInstanceUID), "key": key})
    summary = analyser.analyse(str(frontal.StudyInstanceUID), items)
    by_uid = {image["sop_instance_uid"]: image for image in summary["images"]}
    assert by_uid[str(frontal.SOPInstanceUID)]["status"] == "analysed"
    assert by_uid[str(real.SOPInstanceUID)]["status"] == "analysed"
    refused = by_uid[str(lateral.SOPInstanceUID)]
    assert refused["status"] == "not_analysed"
    assert "does not show two lung fields side by side" in refused["reason"]
