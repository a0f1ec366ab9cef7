"""`pleura demo`, as a new user runs it after the set-up command."""

from __future__ import annotations

import subprocess
import sys

import pydicom

from dicom_samples import dciodvfy_errors
from services import REPO


def test_demo_sends_an_image_and_shows_what_came_back(tmp_path, demo_bundle):
    workdir = tmp_path / "demo"
    run = subprocess.run(
        [sys.executable, "-m", "pleura.cli", "demo", "--workdir", str(workdir), "--timeout", "300"],
        capture_output=True, text=True, timeout=420, cwd=REPO, env={"PATH": "/usr/bin:/bin", "PLEURA_MODEL_BUNDLE_DIR": str(demo_bundle), "HOME": str(tmp_path)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SYNTHETIC DEMO MODEL" in run.stdout
    assert "flagged" in run.stdout and "YES" in run.stdout
    received = sorted((workdir / "pacs-received").glob("*.dcm"))
    modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received)
    assert modalities == ["OT", "PR", "SEG", "SR"]  # SC, GSPS, SEG, SR
    assert "largest pleural gap" in run.stdout and " mm" in run.stdout
    for path in received:
        assert dciodvfy_errors(path) == []
    png = workdir / "result.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
