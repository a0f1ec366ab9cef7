"""Everything Pleura's processes create under the storage directory is their own user's alone
(files 0600, folders 0700), whatever the umask they were started with: the ledger and the embedded
broker hold patient identifiers, previews and outlines show the images. Each long-running command
(`pleura node`, `worklist`, `export-worker`, `worker`) runs with the umask 077."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from dicom_peers import storescu
from dicom_samples import save_dataset, synthetic_radiograph
from node.ledger.engine import open_engine
from services import Process, free_port, http_get, pleura_process, port_open, wait_for, write_config
from worklist_fixtures import API_USERS, RADIOLOGIST_TOKEN


@contextmanager
def umask_022():
    """The usual umask, which would make files readable by everyone (0644) and folders 0755."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def started_with_umask_022(command: str, config: Path, log: Path, env: dict[str, str] | None = None,
                           args: tuple[str, ...] = ()) -> Process:
    with umask_022():
        return pleura_process(command, config, log, env, args=args)


def process_umask(process: Process) -> int:
    """The umask the running process has now (Linux: /proc/PID/status)."""
    for line in Path(f"/proc/{process.proc.pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/PID/status")


def readable_by_others(storage: Path) -> dict[str, str]:
    """What under `storage` (itself included) others than its owner may read, with its mode."""
    return {
        path.relative_to(storage).as_posix() or ".": oct(stat.S_IMODE(path.stat().st_mode))
        for path in [storage, *storage.rglob("*")]
        if stat.S_IMODE(path.stat().st_mode) & 0o077
    }


def test_the_node_creates_nothing_others_can_read(tmp_path):
    storage = tmp_path / "storage"  # made by the node itself
    port, api_port, metrics_port = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml", storage_dir=storage, port=port, api_port=api_port, metrics_port=metrics_port,
        settle_seconds=1,  # dispatched to the embedded broker; no worker takes it in this test
    )
    node = started_with_umask_022("node", config, tmp_path / "node.log", {"PLEURA_API_USERS": json.dumps(API_USERS)},
                                  args=("--no-export-worker",))
    try:
        wait_for(lambda: (port_open(port) and port_open(api_port)) or not node.alive(), 120, "the node to listen")
        assert node.alive(), node.output()
        assert process_umask(node) == 0o077
        image = save_dataset(synthetic_radiograph(), tmp_path / "image.dcm")
        sent = storescu(port, [image], called_ae="PLEURA")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        headers = {"Authorization": f"Bearer {RADIOLOGIST_TOKEN}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", headers=headers, timeout=120) as api:
            (study,) = wait_for(lambda: api.get("/api/studies").json(), 60, "the study in the worklist")
            assert api.get(f"/api/studies/{study['ref']}/images/0/preview.png").status_code == 200
            painted = np.zeros((64, 64, 4), dtype=np.uint8)
            painted[10:30, 10:30] = (255, 0, 0, 255)
            buffer = io.BytesIO()
            Image.fromarray(painted, "RGBA").save(buffer, format="PNG")
            mask = base64.b64encode(buffer.getvalue()).decode()
            correction = api.post(f"/api/studies/{study['ref']}/images/0/correction", json={"mask_png": mask})
            assert correction.status_code == 201, correction.text
        wait_for(lambda: (storage / "broker.sqlite").exists(), 60, "the study dispatched to the embedded broker")
    finally:
        node.stop()

    names = {path.relative_to(storage).as_posix() for path in storage.rglob("*")}
    for expected in ("ledger.sqlite", "broker.sqlite", "audit.jsonl", "instances", "previews", "feedback"):
        assert expected in names, sorted(names)
    assert readable_by_others(storage) == {}


def test_the_ledger_database_is_private_from_its_creation(tmp_path):
    """SQLite makes the file with the umask's mode; the ledger makes it 0600 before SQLite opens it,
    so it is never readable by others, not even until the ledger's schema is in place."""
    database = tmp_path / "ledger.sqlite"
    with umask_022():
        engine = open_engine(f"sqlite:///{database}")
        try:
            engine.connect().close()
        finally:
            engine.dispose()
    assert oct(stat.S_IMODE(database.stat().st_mode)) == oct(0o600)


def test_pleura_worklist_creates_nothing_others_can_read(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o700)  # `pleura worklist` needs it made (by the node, or here)
    api_port = free_port()
    config = write_config(tmp_path / "worklist.toml", storage_dir=storage, api_host="127.0.0.1", api_port=api_port)
    worklist = started_with_umask_022("worklist", config, tmp_path / "worklist.log",
                                      {"PLEURA_API_USERS": json.dumps(API_USERS)})
    try:
        wait_for(lambda: port_open(api_port) or not worklist.alive(), 120, "pleura worklist to listen")
        assert worklist.alive(), worklist.output()
        assert process_umask(worklist) == 0o077
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=120) as api:
            assert api.post("/api/session", json={"token": RADIOLOGIST_TOKEN}).status_code == 200  # audited
            assert api.get("/api/studies").status_code == 200
    finally:
        worklist.stop()
    names = {path.relative_to(storage).as_posix() for path in storage.rglob("*")}
    assert {"ledger.sqlite", "audit.jsonl"} <= names, sorted(names)
    assert readable_by_others(storage) == {}


def run_until_ready_with_umask_022(command: str, config: Path, log: Path, metrics_port: int, timeout: float,
                                   args: tuple[str, ...] = ()) -> None:
    """Start `command` with umask 022, wait until its /readyz answers 200, check its umask, stop it."""
    process = started_with_umask_022(command, config, log, args=args)
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200 if port_open(metrics_port)
                 else not process.alive(), timeout, f"pleura {command} ready")
        assert process.alive(), process.output()
        assert process_umask(process) == 0o077
    finally:
        process.stop()


def test_pleura_export_worker_creates_nothing_others_can_read(tmp_path):
    storage = tmp_path / "storage"  # made by the export worker itself
    metrics_port = free_port()
    config = write_config(tmp_path / "export.toml", storage_dir=storage, metrics_port=metrics_port)
    run_until_ready_with_umask_022("export-worker", config, tmp_path / "export-worker.log", metrics_port, 120)
    names = {path.relative_to(storage).as_posix() for path in storage.rglob("*")}
    assert {"ledger.sqlite", "broker.sqlite"} <= names, sorted(names)
    assert readable_by_others(storage) == {}


def test_pleura_worker_creates_nothing_others_can_read(tmp_path, demo_bundle):
    storage = tmp_path / "storage"  # made by the worker itself
    metrics_port = free_port()
    config = write_config(tmp_path / "worker.toml", storage_dir=storage, model_dir=demo_bundle, device="cpu",
                          worker_metrics_port=metrics_port)
    # Ready once its model is loaded and warm; the radiograph queue only (no CT demo bundle to build).
    run_until_ready_with_umask_022("worker", config, tmp_path / "worker.log", metrics_port, 300,
                                   args=("--queues", "radiograph"))
    names = {path.relative_to(storage).as_posix() for path in storage.rglob("*")}
    assert "broker.sqlite" in names, sorted(names)
    assert readable_by_others(storage) == {}
