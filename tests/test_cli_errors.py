"""Every expected failure of the real `pleura` command ends in one line that says what failed,
where, and what to do, with exit code 2; its traceback only with ``pleura --debug``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_peers import free_port
from services import REPO
from training.synthetic import write_siim_dataset

TOKEN = "t" * 32


def pleura(*args: str, env: dict[str, str] | None = None, debug: bool = False) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    command = [sys.executable, "-m", "pleura.cli", *(["--debug"] if debug else []), *args]
    return subprocess.run(command, env={**clean, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=120)


def error_line(result: subprocess.CompletedProcess, prefix: str = "Error: ") -> str:
    """The one line that reports the failure (log lines before it may say what was started)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "╭" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def node_env(tmp_path: Path, demo_bundle: Path, **values: object) -> dict[str, str]:
    env = {"PLEURA_STORAGE_DIR": str(tmp_path / "storage"), "PLEURA_HOST": "127.0.0.1", "PLEURA_PORT": str(free_port()),
           "PLEURA_METRICS_PORT": str(free_port()), "PLEURA_MODEL_BUNDLE_DIR": str(demo_bundle)}
    env.update({f"PLEURA_{k.upper()}": str(v) for k, v in values.items()})
    return env


def test_the_dicom_port_in_use(tmp_path: Path, demo_bundle: Path, taken_port: int) -> None:
    line = error_line(pleura("node", "--no-export-worker", env=node_env(tmp_path, demo_bundle, port=taken_port)))
    assert f"127.0.0.1:{taken_port}" in line and "already in use" in line and "PLEURA_PORT" in line, line


def test_the_metrics_port_in_use(tmp_path: Path, demo_bundle: Path, taken_port: int) -> None:
    line = error_line(pleura("node", "--no-export-worker", env=node_env(tmp_path, demo_bundle, metrics_port=taken_port)))
    assert f"127.0.0.1:{taken_port}" in line and "already in use" in line and "PLEURA_METRICS_PORT" in line, line


def test_the_api_port_in_use(tmp_path: Path, demo_bundle: Path, taken_port: int) -> None:
    users = json.dumps([{"name": "reader", "token": TOKEN}])
    env = node_env(tmp_path, demo_bundle, api_port=taken_port, api_users=users)
    (tmp_path / "storage").mkdir()
    line = error_line(pleura("worklist", env=env))
    assert f"127.0.0.1:{taken_port}" in line and "already in use" in line and "PLEURA_API_PORT" in line, line
    line = error_line(pleura("node", "--no-export-worker", env=env))
    assert f"127.0.0.1:{taken_port}" in line and "PLEURA_API_PORT" in line, line


def test_a_storage_folder_that_cannot_be_made(tmp_path: Path, demo_bundle: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = node_env(tmp_path, demo_bundle, storage_dir=blocker / "storage")
    line = error_line(pleura("node", "--no-export-worker", env=env))
    assert str(blocker / "storage") in line and "PLEURA_STORAGE_DIR" in line, line
    line = error_line(pleura("check", env=env))
    assert "PLEURA_STORAGE_DIR" in line, line
    debug = pleura("node", "--no-export-worker", env=env, debug=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_an_unreadable_bundle(tmp_path: Path, demo_bundle: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    (bundle / "manifest.json").write_bytes(b"\xff\xfe{ not a manifest")
    env = {"PLEURA_STORAGE_DIR": str(tmp_path / "storage")}
    line = error_line(pleura("models", "import", str(bundle), env=env), "Bundle refused: ")
    assert str(bundle / "manifest.json") in line and "not UTF-8" in line, line
    line = error_line(pleura("worker", env={**env, "PLEURA_MODEL_BUNDLE_DIR": str(bundle)}), "Model bundle error")
    assert str(bundle / "manifest.json") in line, line


def test_a_label_file_that_is_not_utf8(tmp_path: Path) -> None:
    data = write_siim_dataset(tmp_path / "siim", n=4, size=64, seed=3)
    labels = data / "train-rle.csv"
    text = labels.read_text().splitlines()
    labels.write_bytes("\n".join([*text[:2], "Bj\xf6rk," + text[2].split(",", 1)[1], *text[3:]]).encode("latin-1") + b"\n")
    line = error_line(pleura("dataset", "check", "--data", str(data)), "Data error: ")
    assert f"{labels}, line 3, byte 3: not UTF-8" in line, line
