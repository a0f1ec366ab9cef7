"""Load benchmark: concurrent DCMTK storescu senders into `pleura node`, against DCMTK's storescp
receiving the same files in the same run, then time-to-flag one study at a time and in a burst.

    .venv/bin/python benchmarks/load.py [--senders 4] [--instances 2000] [--studies 20]

Ingest: instances/s and MB/s that `pleura node` acknowledges (written durably, recorded in the
ledger, dispatched to the embedded broker), and the same for storescp (which writes without fsync)
as the reference; the ratio is node / storescp. No loss and no duplicates are checked from the
ledger. Time to flag: from the end of the sending association to the moment the PACS acknowledged
the study's SR (the outbox row's sent_at), with `pleura worker` on the CPU and the demo bundle; the
PACS is the demo's receiving stand-in. Results go to stdout as a Markdown table for
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.ledger import Ledger  # noqa: E402
from pleura.pacs_standin import ReceivingPACS  # noqa: E402
from training.synthetic import synthetic_dicom  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} not found: run ./scripts/setup.sh (DCMTK)")
    return path


def make_files(folder: Path, count: int, size: int, per_study: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    study = None
    for index in range(count):
        ds, _ = synthetic_dicom(seed=seed + index, positive=index % 2 == 0, size=size)
        if index % per_study == 0:
            study = (ds.StudyInstanceUID, ds.PatientID, ds.PatientName)
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName = study
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send_concurrently(port: int, called: str, files: list[Path], senders: int) -> float:
    """Seconds for `senders` storescu processes to send `files` between them (round robin)."""
    shares = [files[i::senders] for i in range(senders)]

    def run(index: int) -> None:
        done = subprocess.run(
            [tool("storescu"), "-aet", f"LOAD{index}", "-aec", called, "127.0.0.1", str(port), *map(str, shares[index])],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])

    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(run, range(senders)))
    return time.perf_counter() - started


def write_config(path: Path, **values: object) -> Path:
    lines = []
    for key, value in values.items():
        if key == "destinations":
            continue
        lines.append(f'{key} = {value!r}\n' if not isinstance(value, str) else f'{key} = "{value}"\n')
    for dest in values.get("destinations", []):  # type: ignore[union-attr]
        lines.append("[[destinations]]\n" + "".join(f'{k} = {v!r}\n' if not isinstance(v, str) else f'{k} = "{v}"\n'
                                                        for k, v in dest.items()))
    path.write_text("".join(lines))
    return path


def pleura(command: str, config: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    return subprocess.Popen([sys.executable, "-m", "pleura.cli", command, "--config", str(config)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def ingest(work: Path, files: list[Path], senders: int, max_pdu: int) -> dict[str, float]:
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    reference_dir = work / "storescp"
    reference_dir.mkdir()
    port = free_port()
    # --fork: one process per association, so concurrent senders are served at once as by the node.
    reference = subprocess.Popen([tool("storescp"), "--fork", "--max-pdu", str(max_pdu), "-aet", "REF", "-od",
                                  str(reference_dir), str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        reference_seconds = send_concurrently(port, "REF", files, senders)
    finally:
        reference.terminate()
        reference.wait(10)

    port = free_port()
    storage = work / "node-storage"
    config = write_config(work / "ingest.toml", ae_title="PLEURA", host="127.0.0.1", port=port,
                          storage_dir=str(storage), settle_seconds=1.0, max_associations=senders + 2,
                          max_pdu=max_pdu)
    node = pleura("node", config, work / "ingest-node.log")
    try:
        wait_port(port)
        node_seconds = send_concurrently(port, "PLEURA", files, senders)
    finally:
        stop(node)
    ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
    studies = {pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID
               for p in files}
    recorded = [i.sop_instance_uid for s in studies for i in ledger.list_instances(str(s))]
    ledger.close()
    assert len(recorded) == len(set(recorded)) == len(files), "instances lost or duplicated"
    return {
        "files": len(files), "megabytes": megabytes,
        "node_rate": len(files) / node_seconds, "node_mbps": megabytes / node_seconds,
        "reference_rate": len(files) / reference_seconds, "reference_mbps": megabytes / reference_seconds,
    }


def time_to_flag(work: Path, files: list[Path], senders: int, bundle: Path) -> dict[str, list[float]]:
    pacs = ReceivingPACS(work / "pacs").start()
    port = free_port()
    storage = work / "ttf-storage"
    config = write_config(work / "ttf.toml", ae_title="PLEURA", host="127.0.0.1", port=port,
                          storage_dir=str(storage), model_bundle_dir=str(bundle), device="cpu", settle_seconds=1.0,
                          destinations=[{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}])
    node = pleura("node", config, work / "ttf-node.log")
    worker = pleura("worker", config, work / "ttf-worker.log")
    ledger: Ledger | None = None
    results: dict[str, list[float]] = {"single": [], "burst": []}
    try:
        wait_port(port)
        ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")

        def flagged_at(study: str) -> datetime | None:
            rows = [r for r in ledger.list_outbox(study) if r.result_kind == "SR" and r.status == "sent"]
            return rows[0].sent_at if rows else None

        def study_of(path: Path) -> str:
            return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

        half = len(files) // 2
        warm = files[0]  # the first analysis loads the models: not counted
        subprocess.run([tool("storescu"), "-aec", "PLEURA", "127.0.0.1", str(port), str(warm)], check=True,
                       capture_output=True)
        while flagged_at(study_of(warm)) is None:
            time.sleep(0.2)
        for path in files[1:half]:
            subprocess.run([tool("storescu"), "-aec", "PLEURA", "127.0.0.1", str(port), str(path)], check=True,
                           capture_output=True)
            sent = datetime.now(timezone.utc)
            study = study_of(path)
            while (at := flagged_at(study)) is None:
                time.sleep(0.1)
            results["single"].append((at - sent).total_seconds())
        burst = files[half:]
        send_concurrently(port, "PLEURA", burst, senders)
        sent = datetime.now(timezone.utc)
        for path in burst:
            study = study_of(path)
            while (at := flagged_at(study)) is None:
                time.sleep(0.2)
            results["burst"].append(max(0.0, (at - sent).total_seconds()))
    finally:
        stop(worker)
        stop(node)
        pacs.stop()
        if ledger is not None:
            ledger.close()
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of the ingest images")
    parser.add_argument("--studies", type=int, default=20, help="studies for time to flag (one 512 px image each)")
    parser.add_argument("--max-pdu", type=int, default=16384, help="largest PDU both receivers take (storescp's default)")
    parser.add_argument("--bundle", type=Path, default=Path.home() / ".local/share/pleura/models/demo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pleura-load-") as tmp:
        work = Path(tmp)
        files = make_files(work / "ingest-files", args.instances, args.size, per_study=10, seed=10_000)
        figures = ingest(work, files, args.senders, args.max_pdu)
        ttf_files = make_files(work / "ttf-files", args.studies + 1, 512, per_study=1, seed=90_000)
        flags = time_to_flag(work, ttf_files, args.senders, args.bundle)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU, Python {platform.python_version()}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d}; command: {' '.join(sys.argv)}\n")
    print("| measure | pleura node | storescp (reference) | ratio |\n| --- | --- | --- | --- |")
    print(f"| instances/s ({figures['files']} x {args.size}x{args.size}, {args.senders} senders, max PDU {args.max_pdu}) | "
          f"{figures['node_rate']:.0f} | {figures['reference_rate']:.0f} | {figures['node_rate'] / figures['reference_rate']:.2f} |")
    print(f"| MB/s | {figures['node_mbps']:.1f} | {figures['reference_mbps']:.1f} | "
          f"{figures['node_mbps'] / figures['reference_mbps']:.2f} |")
    print("\n| time to flag (s) | p50 | p95 | studies |\n| --- | --- | --- | --- |")
    for name, values in flags.items():
        print(f"| {name} | {percentile(values, 0.5):.1f} | {percentile(values, 0.95):.1f} | {len(values)} |")
    print("\nno instance lost or duplicated (checked in the ledger)")


if __name__ == "__main__":
    main()
