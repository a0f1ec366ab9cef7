"""InstanceStore: durable Part 10 files under UID-named folders, and the quarantine."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

import dicom_peers
from node.storage import InstanceStore, InvalidUIDError, reason_file, validate_uid

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


def test_write_instance_keeps_the_bytes_under_a_relative_key(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    data = dicom_peers.testdata_file("RG1_UNCR.dcm").read_bytes()

    key = store.write_instance(STUDY, SERIES, SOP, data)

    assert key == f"instances/{STUDY}/{SERIES}/{SOP}.dcm"
    assert store.path(key) == tmp_path.resolve() / key
    assert store.path(key).read_bytes() == data
    assert dcmread(store.path(key)).SOPInstanceUID == dcmread(dicom_peers.testdata_file("RG1_UNCR.dcm")).SOPInstanceUID
    # No temporary file is left beside it.
    assert [p.name for p in store.path(key).parent.iterdir()] == [f"{SOP}.dcm"]


def test_writing_again_replaces_the_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    store.write_instance(STUDY, SERIES, SOP, b"first")
    key = store.write_instance(STUDY, SERIES, SOP, b"second")
    assert store.path(key).read_bytes() == b"second"


@pytest.mark.parametrize(
    ("study", "attribute"),
    [
        ("../../etc", "Study Instance UID"),
        ("1.2/../3", "Study Instance UID"),
        ("", "Study Instance UID"),
        ("1..2", "Study Instance UID"),
        ("1." + "2" * 70, "Study Instance UID"),
    ],
)
def test_bad_uids_never_reach_the_file_system(tmp_path: Path, study: str, attribute: str) -> None:
    store = InstanceStore(tmp_path)
    with pytest.raises(InvalidUIDError, match=attribute):
        store.write_instance(study, SERIES, SOP, b"x")
    assert not (tmp_path / "instances").exists()


def test_uid_padding_is_stripped_and_missing_uid_named() -> None:
    assert validate_uid("1.2.3\x00", "SOP Instance UID") == "1.2.3"
    with pytest.raises(InvalidUIDError, match="Series Instance UID is missing"):
        validate_uid(None, "Series Instance UID")


@pytest.mark.parametrize("key", ["../outside.dcm", "/etc/passwd", "instances/../../x", ""])
def test_path_refuses_keys_outside_the_storage_dir(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        InstanceStore(tmp_path / "store").path(key)


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    first = store.quarantine(b"\x00bad", "SOP Instance UID (0008,0018) is missing")
    second = store.quarantine(b"\x01bad", "another reason")

    assert first != second and first.parent == tmp_path.resolve() / "quarantine"
    assert first.read_bytes() == b"\x00bad"
    assert reason_file(first).read_text() == "SOP Instance UID (0008,0018) is missing\n"
    assert reason_file(second).read_text() == "another reason\n"
