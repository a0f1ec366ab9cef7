"""Everything `pleura node` creates under its storage directory is its own user's alone (files
0600, folders 0700), whatever the umask it was started with: the ledger and the embedded broker
hold patient identifiers, previews and outlines show the images."""

from __future__ import annotations

import base64
import io
import json
import os
import stat

import httpx
import numpy as np
from PIL import Image

from dicom_peers import storescu
from dicom_samples import save_dataset, synthetic_radiograph
from services import free_port, pleura_process, port_open, wait_for, write_config
from worklist_fixtures import API_USERS, RADIOLOGIST_TOKEN


def test_the_node_creates_nothing_others_can_read(tmp_path):
    storage = tmp_path / "storage"  # made by the node itself
    port, api_port, metrics_port = free_port(), free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml", storage_dir=storage, port=port, api_port=api_port, metrics_port=metrics_port,
        settle_seconds=1,  # dispatched to the embedded broker; no worker takes it in this test
    )
    previous = os.umask(0o022)
    try:
        node = pleura_process("node", config, tmp_path / "node.log", {"PLEURA_API_USERS": json.dumps(API_USERS)},
                              args=("--no-export-worker",))
    finally:
        os.umask(previous)
    try:
        wait_for(lambda: (port_open(port) and port_open(api_port)) or not node.alive(), 120, "the node to listen")
        assert node.alive(), node.output()
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

    made = [storage, *storage.rglob("*")]
    names = {path.relative_to(storage).as_posix() for path in made}
    for expected in ("ledger.sqlite", "broker.sqlite", "audit.jsonl", "instances", "previews", "feedback"):
        assert expected in names, sorted(names)
    readable = {
        path.relative_to(storage).as_posix() or ".": oct(stat.S_IMODE(path.stat().st_mode))
        for path in made
        if stat.S_IMODE(path.stat().st_mode) & 0o077
    }
    assert readable == {}, f"readable by others: {readable}"
