"""`pleura demo`: the whole path on one machine, on embedded defaults.

Starts the node (in this process, with its export worker), an analysis worker (a child process)
and a receiving PACS stand-in, all on loopback; sends a synthetic chest radiograph with a
pneumothorax; waits for the results (SR, SEG, GSPS, SC) to arrive at the PACS and shows what they say.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pynetdicom import AE
from rich.console import Console
from rich.table import Table

from config.settings import load_settings
from contract.active import active_bundle_dir
from pleura.pacs_standin import ReceivingPACS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_KIND_BY_CLASS = {
    pydicom.uid.SegmentationStorage: "SEG",
    pydicom.uid.ComprehensiveSRStorage: "SR",
    pydicom.uid.GrayscaleSoftcopyPresentationStateStorage: "GSPS",
    pydicom.uid.SecondaryCaptureImageStorage: "SC",
}


def _kind(path: Path) -> str:
    sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
    return _KIND_BY_CLASS.get(sop_class, str(sop_class))


def _write_toml(path: Path, values: dict) -> None:
    lines = []
    for key, value in values.items():
        if key != "destinations":
            lines.append(f'{key} = "{value}"' if isinstance(value, (str, Path)) else f"{key} = {value}")
    for dest in values.get("destinations", []):
        lines.append("[[destinations]]")
        lines.extend(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in dest.items())
    path.write_text("\n".join(lines) + "\n")


def _send(path: Path, port: int) -> int:
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="DEMOMODALITY")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    if not assoc.is_established:
        raise RuntimeError(f"the node on port {port} refused the association")
    status = assoc.send_c_store(dataset)
    assoc.release()
    return int(status.Status) if status else -1


def _ensure_bundle(console: Console) -> Path:
    from contract.bundle import BundleError, load_bundle

    settings = load_settings()
    try:
        bundle_dir = active_bundle_dir(settings)
        load_bundle(bundle_dir)
    except BundleError:
        from training.demo_model import build_demo_bundle
        from contract.active import demo_bundle_dir

        bundle_dir = demo_bundle_dir(settings)  # never into a registered version: those never change

        console.print(f"building the synthetic demo model into {bundle_dir} (first run only, a few minutes)")
        build_demo_bundle(bundle_dir, progress=True)
    return bundle_dir


def run_demo(workdir: Path | None, timeout: float, console: Console) -> int:
    from node.service import NodeService
    from training.synthetic import synthetic_dicom
    from worker.preview import render_outline_png

    bundle_dir = _ensure_bundle(console)
    workdir = (workdir or Path(tempfile.mkdtemp(prefix="pleura-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pacs = ReceivingPACS(workdir / "pacs-received").start()
    node_port = _free_port()
    config = workdir / "pleura.toml"
    _write_toml(
        config,
        {
            "ae_title": "PLEURA",
            "host": "127.0.0.1",
            "port": node_port,
            "storage_dir": str(workdir / "storage"),
            "model_bundle_dir": str(bundle_dir),
            "settle_seconds": 1.0,
            "export_retry_seconds": 2.0,
            "metrics_port": _free_port(),  # beside a node that may already run here
            "destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
        },
    )
    settings = load_settings(config)
    console.print(f"[bold]Pleura demo[/] in {workdir}")
    console.print(f"  node PLEURA@127.0.0.1:{node_port} (embedded broker), PACS stand-in {pacs.ae_title}@127.0.0.1:{pacs.port}")

    service = NodeService(settings, export_worker=True, export_worker_log=workdir / "export-worker.log")
    service.start()
    worker_log = open(workdir / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "pleura.cli", "worker", "--config", str(config)],
        stdout=worker_log, stderr=subprocess.STDOUT,
    )
    try:
        source, _ = synthetic_dicom(seed=2024, positive=True, size=512)
        source_path = workdir / "sent" / "chest-with-pneumothorax.dcm"
        source_path.parent.mkdir(parents=True, exist_ok=True)
        source.save_as(source_path, enforce_file_format=True)
        status = _send(source_path, node_port)
        console.print(f"  sent {source_path.name}: C-STORE status 0x{status:04X}")
        if status != 0:
            return 1

        deadline = time.monotonic() + timeout
        with console.status("waiting for the analysis and the results at the PACS stand-in…"):
            while True:
                study = service.ledger.study_status(source.StudyInstanceUID)
                if study and study["status"] in ("delivered", "delivery_failed", "failed", "not_analysed"):
                    break
                if worker.poll() is not None:
                    console.print(f"[red]the worker stopped; see {workdir / 'worker.log'}[/]")
                    return 1
                if time.monotonic() > deadline:
                    console.print(f"[red]no results after {timeout:.0f}s; see {workdir}[/]")
                    return 1
                time.sleep(0.5)
        if study["status"] != "delivered":
            console.print(f"[red]study ended {study['status']}: {study.get('reason')}; see {workdir}[/]")
            return 1

        received = {_kind(p): p for p in list(pacs.received)}
        [image] = service.ledger.list_instances(source.StudyInstanceUID)
        mask = np.zeros((source.Rows, source.Columns), dtype=bool)
        if "SEG" in received:
            mask = pydicom.dcmread(received["SEG"]).pixel_array.astype(bool)
            mask = mask.reshape(-1, source.Rows, source.Columns).any(axis=0)
        png = render_outline_png(
            source, mask, workdir / "result.png",
            caption=f"p={study['probability']:.2f} {'FLAGGED' if study['flagged'] else 'not flagged'} - synthetic demo model",
        )

        table = Table(title="Result (SYNTHETIC DEMO MODEL - not for clinical use)")
        table.add_column("item")
        table.add_column("value", overflow="fold")
        table.add_row("pneumothorax probability", f"{study['probability']:.3f}")
        table.add_row("flagged", "[bold red]YES[/]" if study["flagged"] else "no")
        table.add_row("side", image.side or "-")
        table.add_row("area", f"{int(mask.sum())} px" + (f", {study['area_cm2']:.1f} cm²" if study.get("area_cm2") else ""))
        table.add_row("largest pleural gap", f"{image.gap_mm:.1f} mm" if image.gap_mm is not None else "-")
        table.add_row(
            "share of the hemithorax (estimate)",
            f"{100 * image.hemithorax_fraction:.0f} %" if image.hemithorax_fraction is not None else "-",
        )
        table.add_row("model", f"{study.get('model_name')} {study.get('model_version')}")
        for kind, path in sorted(received.items()):
            table.add_row(f"{kind} received", str(path))
        table.add_row("outline PNG", str(png))
        console.print(table)
        return 0
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()
        service.stop()
        pacs.stop()
