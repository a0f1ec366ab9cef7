"""Several modalities at once: concurrent storescu senders, hundreds of instances, no loss and no
duplicates in storage, ledger or dispatch. (Rates and time-to-flag are measured by
benchmarks/load.py, not asserted here.)"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.uid import generate_uid

import dicom_peers
from node.settle import SettleLoop
from test_node_admission import start_node
from test_node_scp import crafted_cr

SENDERS = 4
PER_SENDER = 60
STUDIES_PER_SENDER = 3


def test_concurrent_senders_lose_nothing_and_duplicate_nothing(tmp_path: Path) -> None:
    scp, settings, ledger = start_node(tmp_path, max_associations=SENDERS + 2)
    try:
        batches: list[list[Path]] = []
        expected: dict[str, set[str]] = {}
        for sender in range(SENDERS):
            folder = tmp_path / f"sender-{sender}"
            folder.mkdir()
            studies = [generate_uid() for _ in range(STUDIES_PER_SENDER)]
            files = []
            for index in range(PER_SENDER):
                study = studies[index % STUDIES_PER_SENDER]
                ds = crafted_cr(StudyInstanceUID=study, PatientID=f"LOAD-{sender}")
                path = folder / f"{index}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
                expected.setdefault(study, set()).add(str(ds.SOPInstanceUID))
            batches.append(files)
        # Each sender also repeats its first ten instances, as a modality retrying would.
        batches = [files + files[:10] for files in batches]

        def send(index_files: tuple[int, list[Path]]) -> subprocess.CompletedProcess:
            index, files = index_files
            return dicom_peers.storescu(settings.port, files, called_ae="PLEURA", calling_ae=f"MOD{index}", timeout=300)

        with ThreadPoolExecutor(SENDERS) as pool:
            runs = list(pool.map(send, enumerate(batches)))
        for run in runs:
            assert run.returncode == 0, run.stderr[-2000:]
            assert run.stderr.count("Received Store Response (Success)") == PER_SENDER + 10

        total = SENDERS * PER_SENDER
        stored = sorted((settings.storage_dir / "instances").rglob("*.dcm"))
        assert len(stored) == total
        assert sum(len(ledger.list_instances(study)) for study in expected) == total
        for study, sop_uids in expected.items():
            assert {i.sop_instance_uid for i in ledger.list_instances(study)} == sop_uids

        dispatched: list[tuple[str, int]] = []
        loop = SettleLoop(ledger, lambda study, instances: dispatched.append((study, len(instances))) or "task", 0)
        loop.run_once()
        loop.run_once()
        assert sorted(dispatched) == sorted((study, len(uids)) for study, uids in expected.items())  # each once
    finally:
        scp.stop()
        ledger.close()
