"""Real DICOM peers for tests: DCMTK's echoscu and storescu as the modality, storescp as a
receiving PACS, free loopback ports, and the pydicom-data radiographs.

Import it from a test module as ``import dicom_peers`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from dicom_samples import pydicom_data_file

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


# Ports handed out by the kernel for bind(0) and outgoing connections lie above this (Linux's
# ip_local_port_range starts at 32768); the test sessions running side by side (pytest-xdist) each
# take ports from their own slice below it, so two of them never pick the same free port.
_SLICES_START, _SLICES_END = 12000, 32000


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now.

    Alone, the kernel picks it. Under pytest-xdist, the worker takes one from its own slice of
    ports, so a port one worker found free is not also given to another before its server binds it.
    """
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            return sock.getsockname()[1]
    width = (_SLICES_END - _SLICES_START) // count
    start = _SLICES_START + int(worker[2:]) % count * width
    for _ in range(200):
        port = random.randrange(start, start + width)
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        if not port_open(port):
            return port
    raise RuntimeError(f"no free port in {start}..{start + width} for {worker}")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll until `condition()` is truthy and return it; raise naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def dcmtk_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"DCMTK's {name} is not installed (Debian package dcmtk)")
    return path


testdata_file = pydicom_data_file


def echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dcmtk_tool("echoscu"), "-aet", calling_ae, "-aec", called_ae, "-to", "10", LOOPBACK, str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    called_ae: str,
    calling_ae: str = "STORESCU",
    options: Sequence[str] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """Send `files` with DCMTK's storescu (verbose, so responses show in stdout/stderr).

    `options` picks the proposed transfer syntaxes: none proposes uncompressed only, ``-xv``
    proposes JPEG 2000 lossless as well, ``-xw`` JPEG 2000 lossy, ``-xs`` JPEG lossless.
    """
    return subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-v",
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            "-to",
            "10",
            *options,
            LOOPBACK,
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class StoreSCP:
    """DCMTK's storescp on a free loopback port, writing what it receives to `folder`.

    It accepts every transfer syntax and unknown SOP classes, like a permissive PACS.
    Use as a context manager, or call stop().
    """

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.log = self.folder.parent / f"storescp-{self.port}.log"
        self._log_handle = open(self.log, "wb")
        self.process = subprocess.Popen(
            [dcmtk_tool("storescp"), "-aet", ae_title, "+xa", "-pm", "-od", str(self.folder), "-v", str(self.port)],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(lambda: self.process.poll() is not None or port_open(self.port), 20, "storescp to listen")
            if self.process.poll() is not None:
                raise RuntimeError(f"storescp exited at start: {self.output()}")
        except BaseException:
            self.stop()
            raise

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log_handle.close()

    def __enter__(self) -> StoreSCP:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
