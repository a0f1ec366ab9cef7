"""Fuzzing the receive path: real radiographs with bytes flipped, cut or inserted, sent as they are
to a running SCP. Whatever arrives, the node answers with a status from PS3.4, keeps what it
refuses, records what it accepts, and answers the next sender. Bounded: a fixed number of examples
with a fixed seed, so CI runs the same inputs in the same time."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pynetdicom import AE, _config, evt

import dicom_peers
from dicom_samples import synthetic_radiograph
from test_node_admission import echo, start_node
from test_node_scp import pynetdicom_store

ACCEPTED_STATUSES = {0x0000, 0xA700, 0xA900} | set(range(0xC000, 0xD000))


class Running:
    """The node under test and the radiograph the mutations start from."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.scp, self.settings, self.ledger = start_node(folder)
        original = synthetic_radiograph(rows=64, columns=64)
        self.sop_class = str(original.SOPClassUID)
        path = folder / "original.dcm"
        original.save_as(path, enforce_file_format=True)
        self.raw = path.read_bytes()

    def quarantined(self) -> int:
        folder = self.settings.storage_dir / "quarantine"
        return len(list(folder.glob("*.dcm"))) if folder.exists() else 0

    def __repr__(self) -> str:
        return f"Running(port={self.settings.port})"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    node = Running(tmp_path_factory.mktemp("fuzz"))
    yield node
    node.scp.stop()
    node.ledger.close()


def _meta_end(raw: bytes) -> int:
    return 132 + 12 + int.from_bytes(raw[140:144], "little")


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_radiographs_never_break_the_node(running, mutations, monkeypatch_chunked) -> None:
    raw = running.raw
    start = _meta_end(raw)  # keep the file meta, so the sender streams the data set as it is
    body = bytearray(raw[start:])
    for kind, position, value in mutations:
        position %= max(1, len(body))
        if kind == "flip" and body:
            body[position] ^= value
        elif kind == "cut":
            del body[position:]
        elif kind == "insert":
            body[position:position] = bytes([value]) * 4
    path = running.folder / "mutated.dcm"
    path.write_bytes(raw[:start] + bytes(body))
    quarantined = running.quarantined()

    status = int(pynetdicom_store(running.settings.port, path, sop_class=running.sop_class).Status)

    assert status in ACCEPTED_STATUSES, hex(status)
    if status == 0xA900 or 0xC000 <= status <= 0xCFFF:
        assert running.quarantined() == quarantined + 1  # refused and kept
    assert echo(running.settings.port, "FUZZ")


@pytest.fixture(scope="module")
def monkeypatch_chunked() -> Iterator[None]:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def test_an_association_aborted_mid_transfer_stores_nothing_and_harms_nothing(tmp_path: Path) -> None:
    scp, settings_, ledger = start_node(tmp_path, max_pdu=16384)  # the sender must cut the data set in many PDUs
    try:
        big = synthetic_radiograph(rows=64, columns=64)
        big.Rows = big.Columns = 4096
        big.PixelData = np.zeros((4096, 4096), dtype=np.uint16).tobytes()  # 32 MB in many PDUs
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context(big.SOPClassUID, big.file_meta.TransferSyntaxUID)
        sent = []

        def cut_after_50_pdus(event) -> None:
            # About 800 kB of 32 MB are on their way: the connection drops, as a network would.
            sent.append(1)
            if len(sent) == 50:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

        assoc = ae.associate(
            "127.0.0.1", settings_.port, ae_title="PLEURA", evt_handlers=[(evt.EVT_PDU_SENT, cut_after_50_pdus)]
        )
        assert assoc.is_established
        _ignore_errors(assoc.send_c_store, big)
        assert len(sent) >= 50
        dicom_peers.wait_for(lambda: echo(settings_.port, "AFTER"), 20, "the node to answer after the abort")
        assert not ledger.has_instance(big.SOPInstanceUID)
        assert ledger.list_studies() == []
        assert not (settings_.storage_dir / "instances").exists() or not any((settings_.storage_dir / "instances").rglob("*.dcm"))
    finally:
        scp.stop()
        ledger.close()


def _ignore_errors(call, *args) -> None:
    try:
        call(*args)
    except Exception:
        pass
