"""Memory per C-STORE: the node receives to disk in chunks, so its resident memory stays flat
whatever the instance size; an instance over max_instance_bytes is answered out of resources, and
a data set that declares more than it sends is refused.

The sender is pynetdicom streaming from a file on disk (STORE_SEND_CHUNKED_DATASET), and the test
file is written in chunks, so neither side holds the instance in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import _config

import dicom_peers
from node.ledger import Ledger
from scp_node import running_node
from test_node_scp import crafted_cr, pynetdicom_store, reason_file

HUGE = 1024**3
"""The large element: 1 GiB."""
RSS_GROWTH_BOUND = 150 * 1024**2
"""The node's resident memory may grow by at most this while it receives 1 GiB (it grew ~4 GB)."""
PLACEHOLDER = b"PLACEHOLDERVALUE"


def instance_file(path: Path, element_bytes: int, sent_bytes: int | None = None) -> tuple[Path, str]:
    """A CR file with a private OB element (0009,1010) declaring `element_bytes`, of which
    `sent_bytes` (default all) follow, written in 1 MiB chunks; returns it and its SOP Instance UID."""
    ds = crafted_cr()
    block = ds.private_block(0x0009, "PLEURA TEST", create=True)
    block.add_new(0x10, "OB", PLACEHOLDER)
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    at = raw.index(PLACEHOLDER)
    head, tail = raw[: at - 4] + element_bytes.to_bytes(4, "little"), raw[at + len(PLACEHOLDER) :]
    sent = element_bytes if sent_bytes is None else sent_bytes
    chunk = bytes(1024 * 1024)
    with open(path, "wb") as handle:
        handle.write(head)
        for offset in range(0, sent, len(chunk)):
            handle.write(chunk[: min(len(chunk), sent - offset)])
        if sent_bytes is None:
            handle.write(tail)
    return path, str(ds.SOPInstanceUID)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture()
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # stream the file, as it is


@pytest.fixture()
def node_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, dict]]:
    settings = {"storage_dir": str(tmp_path / "store"), "host": "127.0.0.1", "port": dicom_peers.free_port(),
                "min_free_disk_mb": 0}
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "scp_process.py"), json.dumps(settings)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield process, settings
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_a_1_gib_element_is_received_with_flat_memory(
    tmp_path: Path, node_process: tuple[subprocess.Popen, dict], chunked_send: None
) -> None:
    process, settings = node_process
    path, sop_uid = instance_file(tmp_path / "huge.dcm", HUGE)
    dicom_peers.wait_for(lambda: dicom_peers.port_open(settings["port"]), 30, "the node to listen")
    before = rss(process.pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        status = pynetdicom_store(settings["port"], path)
    finally:
        done.set()
        sampler.join(10)
    assert status.Status == 0x0000, status
    assert peak[0] - before < RSS_GROWTH_BOUND, f"RSS grew from {before >> 20} to {peak[0] >> 20} MiB"
    ledger = Ledger(f"sqlite:///{settings['storage_dir']}/ledger.sqlite")
    try:
        assert ledger.has_instance(sop_uid)
    finally:
        ledger.close()
    stored = list(Path(settings["storage_dir"], "instances").rglob(f"{sop_uid}.dcm"))
    assert len(stored) == 1 and stored[0].stat().st_size > HUGE


def test_an_instance_over_the_maximum_size_is_answered_out_of_resources(tmp_path: Path, chunked_send: None) -> None:
    for node in running_node(tmp_path, max_instance_bytes=8 * 1024**2):
        path, sop_uid = instance_file(tmp_path / "big.dcm", 16 * 1024**2)
        status = pynetdicom_store(node.port, path)
        assert status.Status == 0xA700 and "PLEURA_MAX_INSTANCE_BYTES" in status.ErrorComment
        assert not node.ledger.has_instance(sop_uid)
        assert not list(node.settings.storage_dir.rglob("*.dcm"))  # neither stored nor quarantined
        small, small_uid = instance_file(tmp_path / "small.dcm", 1024**2)
        assert pynetdicom_store(node.port, small).Status == 0x0000


def test_a_data_set_declaring_more_than_it_sends_is_refused(tmp_path: Path, chunked_send: None) -> None:
    for node in running_node(tmp_path):
        path, sop_uid = instance_file(tmp_path / "short.dcm", HUGE, sent_bytes=7 * 1024**2)
        status = pynetdicom_store(node.port, path, transfer_syntax=ExplicitVRLittleEndian)
        assert status.Status == 0xC000
        assert not node.ledger.has_instance(sop_uid)
        kept = node.quarantined()
        assert len(kept) == 1 and "cut short" in reason_file(kept[0]).read_text()
