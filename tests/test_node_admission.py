"""Admission to the node: calling-AE allowlist (and addresses), association limit, timeouts for a
stalled peer, the free-space guard, and malformed input that must never crash the node.

Real peers: DCMTK's echoscu and storescu, pynetdicom associations and raw sockets.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

import dicom_peers
from config.settings import Settings
from node.admission import Admission, free_disk_mb
from node.ledger import Ledger
from node.scp import StorageSCP
from node.storage import InstanceStore
from test_node_scp import crafted_cr, pynetdicom_store, reason_file


class Free:
    """The free space the node sees, set by the test (a full disk cannot be made on demand)."""

    def __init__(self, mb: float) -> None:
        self.mb = mb

    def __call__(self) -> float:
        return self.mb


def start_node(tmp_path: Path, free: Free | None = None, **values: object) -> tuple[StorageSCP, Settings, Ledger]:
    settings = Settings(storage_dir=tmp_path / "store", host="127.0.0.1", port=dicom_peers.free_port(), **values)
    settings.storage_dir.mkdir(exist_ok=True)
    ledger = Ledger(settings.ledger_url)
    scp = StorageSCP(settings, ledger, InstanceStore(settings.storage_dir), Admission(settings, free))
    scp.start()
    return scp, settings, ledger


@pytest.fixture()
def started() -> Iterator[list[StorageSCP]]:
    nodes: list[StorageSCP] = []
    yield nodes
    for scp in nodes:
        scp.stop()
        scp.ledger.close()


def echo(port: int, calling: str) -> bool:
    done = dicom_peers.echoscu(port, "PLEURA", calling_ae=calling)
    return done.returncode == 0


def test_only_allowed_callers_may_associate(tmp_path: Path, started: list[StorageSCP]) -> None:
    scp, settings, _ = start_node(tmp_path, allowed_callers=[{"ae_title": "MODALITY"}, {"ae_title": "PACS"}])
    started.append(scp)
    assert echo(settings.port, "MODALITY")
    refused = dicom_peers.echoscu(settings.port, "PLEURA", calling_ae="STRANGER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr, refused.stderr


def test_an_allowed_caller_can_be_bound_to_its_addresses(tmp_path: Path, started: list[StorageSCP]) -> None:
    scp, settings, _ = start_node(
        tmp_path,
        allowed_callers=[{"ae_title": "MODALITY", "hosts": ["10.20.30.40"]}, {"ae_title": "LOCAL", "hosts": ["127.0.0.1"]}],
    )
    started.append(scp)
    assert not echo(settings.port, "MODALITY")  # the right title from the wrong address
    assert echo(settings.port, "LOCAL")


def test_associations_beyond_the_limit_are_refused_until_one_ends(tmp_path: Path, started: list[StorageSCP]) -> None:
    scp, settings, _ = start_node(tmp_path, max_associations=1)
    started.append(scp)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", settings.port, ae_title="PLEURA")
    assert held.is_established
    try:
        refused = dicom_peers.echoscu(settings.port, "PLEURA", calling_ae="SECOND")
        assert refused.returncode != 0
        assert "Local Limit Exceeded" in refused.stderr, refused.stderr
    finally:
        held.release()
    dicom_peers.wait_for(lambda: echo(settings.port, "SECOND"), 10, "the node to take a new association")


def test_a_stalled_peer_is_dropped_and_the_node_stays_healthy(tmp_path: Path, started: list[StorageSCP]) -> None:
    scp, settings, _ = start_node(tmp_path, acse_timeout=1, network_timeout=2)
    started.append(scp)
    silent = socket.create_connection(("127.0.0.1", settings.port), timeout=10)
    try:
        started_at = time.monotonic()
        try:
            answer = silent.recv(1024)
        except ConnectionResetError:
            answer = b""
        except TimeoutError:
            pytest.fail("the node kept a silent connection open")
        # Closed, or an A-ASSOCIATE-RJ / A-ABORT PDU first (types 0x03, 0x07).
        assert answer == b"" or answer[:1] in (b"\x03", b"\x07"), answer[:16]
        assert time.monotonic() - started_at < 9
    finally:
        silent.close()
    assert echo(settings.port, "AFTER")


def test_a_nearly_full_disk_refuses_new_work_and_takes_it_again_when_space_returns(
    tmp_path: Path, started: list[StorageSCP]
) -> None:
    free = Free(5000)
    scp, settings, ledger = start_node(tmp_path, free, min_free_disk_mb=1000)
    started.append(scp)

    # An association already open when the disk fills: its C-STOREs are refused, nothing stored.
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.ComputedRadiographyImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="PLEURA")
    assert assoc.is_established
    free.mb = 200
    try:
        status = assoc.send_c_store(crafted_cr())
    finally:
        assoc.release()
    assert status.Status == 0xA700 and "disk nearly full" in status.ErrorComment
    assert ledger.list_studies() == []

    # New associations are refused (transient: the sender tries again later).
    refused = dicom_peers.echoscu(settings.port, "PLEURA", calling_ae="MODALITY")
    assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stderr, refused.stderr

    free.mb = 5000
    instance = crafted_cr()
    assert pynetdicom_store(settings.port, instance).Status == 0x0000
    assert ledger.has_instance(instance.SOPInstanceUID)


def test_free_disk_is_measured_on_the_storage_file_system(tmp_path: Path) -> None:
    assert free_disk_mb(tmp_path / "not" / "made" / "yet") > 0
    assert Admission(Settings(storage_dir=tmp_path, min_free_disk_mb=0)).disk_refusal() is None
    huge = Admission(Settings(storage_dir=tmp_path, min_free_disk_mb=10**9))
    assert "PLEURA_MIN_FREE_DISK_MB" in (huge.disk_refusal() or "")


def _malformed_corpus(folder: Path) -> dict[str, Path]:
    """Files with a valid file meta (so a sender streams them) and a broken data set."""
    folder.mkdir()
    good = folder / "good.dcm"
    crafted_cr().save_as(good, enforce_file_format=True)
    raw = good.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # preamble, DICM, group length
    body = raw[meta_end:]
    cases = {
        "truncated": raw[: meta_end + len(body) // 2],
        "wrong-length": raw[:meta_end] + body[:6] + (0xFFF0).to_bytes(2, "little") + body[8:],
        "garbage": raw[:meta_end] + bytes(range(256)) * 8,
        "broken-sequence": raw[:meta_end]
        + b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff"  # undefined-length sequence, never closed
        + b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x01" * 4,
        "huge-private": raw + b"\x09\x00\x10\x00LO\x0a\x00PRIVCREAT\x00" + b"\x09\x00\x00\x10OB\x00\x00"
        + (4 * 1024 * 1024).to_bytes(4, "little") + b"\x00" * (4 * 1024 * 1024),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = folder / f"{name}.dcm"
        paths[name].write_bytes(data)
    return paths


def test_malformed_input_is_answered_kept_and_the_node_stays_healthy(
    tmp_path: Path, started: list[StorageSCP], monkeypatch: pytest.MonkeyPatch
) -> None:
    scp, settings, ledger = start_node(tmp_path)
    started.append(scp)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    statuses = {}
    for name, path in _malformed_corpus(tmp_path / "corpus").items():
        statuses[name] = int(pynetdicom_store(settings.port, path).Status)
        assert echo(settings.port, "AFTER"), f"the node stopped answering after {name}"
    # Unparseable data sets: "cannot understand", each kept with its reason. A huge private
    # element is not an error: stored and recorded (the node never decodes pixel or private data).
    assert statuses == {"truncated": 0xC000, "wrong-length": 0xC000, "garbage": 0xC000, "broken-sequence": 0xC000,
                        "huge-private": 0x0000}
    kept = sorted((settings.storage_dir / "quarantine").glob("*.dcm"))
    assert len(kept) == 4
    for path in kept:
        reason = reason_file(path).read_text()
        assert "status: 0xC000" in reason, reason
        assert any(why in reason for why in ("cannot be parsed", "is missing", "cut short")), reason
    assert len(ledger.list_studies()) == 1
    # A good instance after all of that is stored.
    instance = crafted_cr()
    assert pynetdicom_store(settings.port, instance).Status == 0x0000
    assert ledger.has_instance(instance.SOPInstanceUID)
