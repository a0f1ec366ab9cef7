"""Slow, silent and unwanted connections cannot hold the node's association slots: absolute
deadlines for the association request, each PDU and each C-STORE, a per-address cap, and the
address part of the allowlist checked on connect (node/connections.py).

The tricklers are raw sockets from 127.0.0.2 (tests/tricklers.py); the legitimate peers are DCMTK's
echoscu and storescu from 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import dicom_peers
import tricklers
from node.audit import AuditTrail
from node.connections import PduMeter, PduRefused
from scp_node import Node, running_node
from test_node_scp import crafted_cr

TIMEOUTS = {"acse_timeout": 6, "dimse_timeout": 6, "network_timeout": 6}
"""The timeouts of the reproduction: idle timeouts the tricklers never reach."""
DROP_BOUND = 15.0
"""Generous upper bound (s) on how long a trickler with a 2 s deadline may be kept."""


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    yield from running_node(
        tmp_path, max_associations=4, association_request_timeout=2, pdu_timeout=2, store_timeout=30,
        max_associations_per_address=0, **TIMEOUTS,
    )


def echo(port: int) -> bool:
    return dicom_peers.echoscu(port, "PLEURA", calling_ae="MODALITY").returncode == 0


def test_tricklers_holding_every_slot_are_dropped_within_the_deadline(node: Node) -> None:
    request = tricklers.associate_rq()
    pdu = tricklers.p_data(bytes(200), 0x03)
    held = [threading.Event() for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        runs = [pool.submit(tricklers.trickle, node.port, drip=request, ready=held[i]) for i in range(2)]
        runs += [pool.submit(tricklers.trickle, node.port, drip=pdu, associate=True, ready=held[i]) for i in (2, 3)]
        # Every slot is held by a trickler before the first C-ECHO is tried (an echo that got in
        # first would take the slot an associating trickler needs).
        assert all(event.wait(DROP_BOUND) for event in held)
        # The node takes a legitimate association again once the tricklers are dropped.
        dicom_peers.wait_for(lambda: echo(node.port), DROP_BOUND, "a C-ECHO answered while the tricklers run")
        results = [run.result(timeout=60) for run in runs]
    for result in results:
        assert result.connected
        assert result.closed_by_node, result
        assert result.kept_seconds < DROP_BOUND, result
    dropped = [e for e in AuditTrail(node.settings.storage_dir).events() if e["event"] == "connection-dropped"]
    reasons = " ".join(e["reason"] for e in dropped)
    assert len(dropped) == 4 and "PLEURA_ASSOCIATION_REQUEST_TIMEOUT" in reasons and "PLEURA_PDU_TIMEOUT" in reasons


def test_tricklers_from_one_address_leave_room_for_everyone_else(tmp_path: Path) -> None:
    for node in running_node(
        tmp_path, max_associations=4, max_associations_per_address=2, association_request_timeout=2,
        pdu_timeout=2, **TIMEOUTS,
    ):
        request = tricklers.associate_rq()
        deadline = time.monotonic() + 8

        def attacker() -> list[tricklers.Trickled]:
            runs = []
            while time.monotonic() < deadline and len(runs) < 40:  # reconnect as soon as dropped
                runs.append(tricklers.trickle(node.port, drip=request, max_drops=30))
            return runs

        with ThreadPoolExecutor(4) as pool:
            attacks = [pool.submit(attacker) for _ in range(4)]
            served = [echo(node.port) for _ in range(3)]
            stored = dicom_peers.storescu(node.port, [_cr_file(tmp_path)], called_ae="PLEURA", calling_ae="MODALITY")
            runs = [run for attack in attacks for run in attack.result(timeout=60)]
        assert served == [True, True, True]
        assert stored.returncode == 0, stored.stderr
        assert all(run.closed_by_node and run.kept_seconds < DROP_BOUND for run in runs), runs
        refused = [e for e in AuditTrail(node.settings.storage_dir).events() if e["event"] == "connection-refused"]
        assert refused and all("PLEURA_MAX_ASSOCIATIONS_PER_ADDRESS" in e["reason"] for e in refused)
        assert {e["address"] for e in refused} == {tricklers.TRICKLER_ADDRESS}


def _cr_file(folder: Path) -> Path:
    path = folder / "cr.dcm"
    if not path.exists():
        crafted_cr().save_as(path, enforce_file_format=True)
    return path


def test_a_c_store_trickled_in_whole_pdus_is_dropped_at_the_store_deadline(tmp_path: Path) -> None:
    for node in running_node(tmp_path, store_timeout=2, pdu_timeout=30, **TIMEOUTS):
        # Each PDU arrives whole and at once, so neither the idle timeouts nor the PDU deadline
        # apply: a command set that never ends, 4 bytes every 0.5 s (at most 60 s).
        pdus = [tricklers.p_data(b"\x00" * 4, 0x01)] * 120
        result = tricklers.trickle_pdus(node.port, pdus)
        assert result.closed_by_node and result.kept_seconds < DROP_BOUND, result
        reasons = [e["reason"] for e in AuditTrail(node.settings.storage_dir).events() if e["event"] == "connection-dropped"]
        assert len(reasons) == 1 and "PLEURA_STORE_TIMEOUT" in reasons[0]
        assert echo(node.port)


def test_an_address_no_allowed_caller_has_is_closed_before_anything_is_read(tmp_path: Path) -> None:
    for node in running_node(tmp_path, allowed_callers=[{"ae_title": "MODALITY", "hosts": ["127.0.0.1"]}]):
        stranger = tricklers.connect(node.port)
        try:
            stranger.settimeout(DROP_BOUND)
            try:
                answer = stranger.recv(1024)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed, without a byte of association request read
        finally:
            stranger.close()
        refused = [e for e in AuditTrail(node.settings.storage_dir).events() if e["event"] == "connection-refused"]
        assert [e["address"] for e in refused] == [tricklers.TRICKLER_ADDRESS]
        assert "PLEURA_ALLOWED_CALLERS" in refused[0]["reason"]
        assert echo(node.port)


def test_a_pdu_longer_than_max_pdu_ends_the_association(tmp_path: Path) -> None:
    for node in running_node(tmp_path, max_pdu=16384, **TIMEOUTS):
        oversized = b"\x04\x00" + (16384 + 100).to_bytes(4, "big")
        result = tricklers.trickle(node.port, prefix=oversized, drip=b"\x00", associate=True, max_drops=20)
        assert result.closed_by_node and result.kept_seconds < DROP_BOUND, result
        assert echo(node.port)


def test_the_meter_follows_pdus_and_messages_across_arbitrary_reads() -> None:
    meter = PduMeter(max_pdu=1000)
    request = tricklers.associate_rq()
    stream = request + tricklers.p_data(b"c" * 10, 0x01)
    for index in range(len(stream)):  # one byte a read
        meter.feed(stream[index : index + 1], now=float(index))
    assert meter.associate_requested and meter.pdu_started is None
    assert meter.message_in_progress and meter.message_started == len(request)
    last = tricklers.p_data(b"c" * 3, 0x03)
    meter.feed(last[:-1], now=500.0)
    assert meter.pdu_started == 500.0
    meter.feed(last[-1:], now=1000.0)
    assert meter.pdu_started is None
    assert not meter.message_in_progress  # command complete: waits for a data set without a deadline
    meter.feed(tricklers.p_data(b"d" * 50, 0x00), now=2000.0)
    assert meter.message_in_progress and meter.message_started == len(tricklers.associate_rq())
    meter.feed(tricklers.p_data(b"d" * 50, 0x02), now=3000.0)
    assert not meter.message_in_progress
    with pytest.raises(PduRefused, match="PLEURA_MAX_PDU"):
        meter.feed(b"\x04\x00" + (2000).to_bytes(4, "big"), now=4000.0)
    with pytest.raises(PduRefused):
        PduMeter(max_pdu=0).feed(b"\x01\x00" + (2**31).to_bytes(4, "big"), now=0.0)

