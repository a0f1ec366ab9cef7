"""The quarantine is bounded: under the free-space guard, at most quarantine_max_mb in all (the
oldest removed first, each removal audited), and at most max_rejected_per_association rejected
instances from one association, which is aborted at the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE

import dicom_peers
from node.audit import AuditTrail
from scp_node import running_node
from services import REPO
from test_node_admission import Free, start_node
from test_node_scp import crafted_cr


def rejected_instance(size: int = 400_000) -> Dataset:
    """A CR data set the node refuses (0xC000: an invalid Study Instance UID) of about `size` bytes."""
    ds = crafted_cr(StudyInstanceUID="not-a-uid")
    ds.private_block(0x0009, "PLEURA TEST", create=True).add_new(0x10, "OB", bytes(size))
    return ds


def association(port: int) -> object:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(pydicom.uid.ComputedRadiographyImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    assert assoc.is_established
    return assoc


def test_the_quarantine_keeps_the_newest_within_its_size_cap(tmp_path: Path) -> None:
    for node in running_node(tmp_path, quarantine_max_mb=1):
        assoc = association(node.port)
        try:
            statuses = [int(assoc.send_c_store(rejected_instance()).Status) for _ in range(4)]
        finally:
            assoc.release()
        assert statuses == [0xC000] * 4
        kept = node.quarantined()
        folder = node.settings.storage_dir / "quarantine"
        assert sum(path.stat().st_size for path in folder.iterdir()) <= 1_000_000
        assert len(kept) == 2  # 400 kB each: the two newest
        removed = [e for e in AuditTrail(node.settings.storage_dir).events() if e["event"] == "quarantine-removed"]
        assert len(removed) == 2 and all("PLEURA_QUARANTINE_MAX_MB" in e["reason"] for e in removed)
        assert {e["file"] for e in removed}.isdisjoint(path.name for path in kept)
        assert all(e["file"] < min(path.name for path in kept) for e in removed)  # the oldest went first


def test_an_association_sending_too_many_rejected_instances_is_aborted(tmp_path: Path) -> None:
    for node in running_node(tmp_path, max_rejected_per_association=2):
        assoc = association(node.port)
        try:
            first = [int(assoc.send_c_store(rejected_instance(1000)).Status) for _ in range(2)]
            third = assoc.send_c_store(rejected_instance(1000))
            assert "Status" not in third  # no answer: the node aborted
            dicom_peers.wait_for(lambda: assoc.is_aborted, 20, "the association to be aborted")
        finally:
            if assoc.is_established:
                assoc.release()
        assert first == [0xC000, 0xC000]
        assert len(node.quarantined()) == 2
        aborted = [e for e in AuditTrail(node.settings.storage_dir).events() if e["event"] == "association-aborted"]
        assert len(aborted) == 1 and "PLEURA_MAX_REJECTED_PER_ASSOCIATION" in aborted[0]["reason"]
        # The next association starts its own count.
        again = association(node.port)
        try:
            assert int(again.send_c_store(rejected_instance(1000)).Status) == 0xC000
        finally:
            again.release()


def test_nothing_is_quarantined_when_the_disk_is_nearly_full(tmp_path: Path) -> None:
    free = Free(5000)
    scp, settings, _ = start_node(tmp_path, free, min_free_disk_mb=1000)
    try:
        assoc = association(settings.port)
        free.mb = 200
        try:
            status = assoc.send_c_store(rejected_instance(1000))
        finally:
            assoc.release()
        assert status.Status == 0xA700 and "disk nearly full" in status.ErrorComment
        assert not (settings.storage_dir / "quarantine").exists()
    finally:
        scp.stop()
        scp.ledger.close()


def test_pleura_quarantine_lists_what_was_refused_newest_first_with_its_reason(tmp_path: Path) -> None:
    """The PACS team's view of the quarantine: `pleura quarantine` (and `--json`) on the storage
    folder a running node keeps, without a ledger or a network."""
    for node in running_node(tmp_path):
        env = {key: value for key, value in os.environ.items() if not key.startswith("PLEURA_")}
        env["PLEURA_STORAGE_DIR"] = str(node.settings.storage_dir)
        empty = subprocess.run([sys.executable, "-m", "pleura.cli", "quarantine"], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=120)
        assert empty.returncode == 0 and "nothing in quarantine" in empty.stdout, empty.stdout + empty.stderr
        assoc = association(node.port)
        try:
            statuses = [int(assoc.send_c_store(rejected_instance(1000 * (n + 1))).Status) for n in range(3)]
        finally:
            assoc.release()
        assert statuses == [0xC000] * 3
        listed = subprocess.run([sys.executable, "-m", "pleura.cli", "quarantine", "--json", "--limit", "2"], env=env,
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        answer = json.loads(listed.stdout)
        kept = sorted(path.name for path in node.quarantined())
        assert answer["total"] == 3
        assert [entry["name"] for entry in answer["entries"]] == kept[::-1][:2]  # newest first
        reasons = {(node.settings.storage_dir / "quarantine" / entry["name"]).with_suffix(".reason.txt").read_text().strip()
                   for entry in answer["entries"]}
        assert {entry["reason"] for entry in answer["entries"]} == reasons and all(reasons)
        assert answer["entries"][0]["size_bytes"] > answer["entries"][1]["size_bytes"]  # the larger one came last
        text = subprocess.run([sys.executable, "-m", "pleura.cli", "quarantine"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert text.returncode == 0 and len(text.stdout.splitlines()) == 3, text.stdout
