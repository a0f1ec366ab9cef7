"""Load benchmark: concurrent DCMTK storescu senders into `pleura node`, against DCMTK's storescp
receiving the same files in the same run, then time-to-flag one study at a time and in a burst.

    .venv/bin/python benchmarks/load.py [--senders 4] [--instances 2000] [--studies 20] [--burst 20]
        [--flag-size 2048] [--broker embedded|redis] [--pacs orthanc|standin] [--no-ingest]

Ingest: instances/s and MB/s that `pleura node` acknowledges (written durably, recorded in the
ledger, dispatched to the embedded broker), and the same for storescp (which writes without fsync)
as the reference; the ratio is node / storescp. No loss and no duplicates are checked from the
ledger. Time to flag: from the A-RELEASE of the sending association (the ledger's ``released_at``)
to the moment the PACS acknowledged the study's SR (the outbox row's ``sent_at``), with the node's
defaults (embedded broker unless ``--broker redis``, which starts a redis-server of its own) and
`pleura worker` on the CPU with the demo bundle; the PACS is Orthanc when it is installed, else the
demo's receiving stand-in. Each study's time is cut into a **stage budget** from the ledger's
timestamps: settle (release to dispatched), queue (dispatched to a worker's start), analysis (the
worker's start to its summary), record (the summary to the node's record of it) and deliver (the
record to the PACS's answer), the analysis itself cut further by the worker's own line for the
study (reading, decoding, forward pass, measuring, each object built and written). Results go to stdout as Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
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

from sqlalchemy import select  # noqa: E402

from node.ledger import Ledger  # noqa: E402
from node.ledger.schema import AnalysisStart, Association, Instance, OutboxEntry, Result, Study  # noqa: E402
from node.privacy import ref  # noqa: E402
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


def make_files(folder: Path, count: int, size: int, per_study: int, seed: int, positive_every: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    study = None
    for index in range(count):
        ds, _ = synthetic_dicom(seed=seed + index, positive=index % positive_every == 0, size=size)
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


class OrthancPACS:
    """Orthanc (Debian package ``orthanc``) as the receiving PACS, on free ports in ``folder``."""

    ae_title = "ORTHANC"

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, http_port = free_port(), free_port()
        config = {
            "Name": "pleura-benchmark-pacs", "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"), "DicomAet": self.ae_title, "DicomPort": self.port,
            "HttpPort": http_port, "RemoteAccessAllowed": False, "DicomAlwaysAllowStore": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen([tool("Orthanc"), str(folder / "orthanc.json")],
                                        stdout=open(folder / "orthanc.log", "wb"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class RedisBroker:
    """A redis-server of its own on a free port, without persistence."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [tool("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


STAGES = ("settle", "queue", "analysis", "record", "deliver")
WORKER_STAGES = ("read", "decode", "forward", "measure", "SEG", "GSPS", "SC", "SR")
"""The analysis cut further, from the worker's line for each study (worker/stage_times.py)."""
WORKER_LINE = re.compile(r"study (#[0-9a-f]+) analysed: \d+ image\(s\) in \d+ ms \((.*) ms\)")


def worker_stages(log: Path) -> dict[str, dict[str, float]]:
    """Seconds per analysis stage of each study (by its reference) that the worker's log reports."""
    stages: dict[str, dict[str, float]] = {}
    for match in WORKER_LINE.finditer(log.read_text(errors="replace")):
        figures = dict(item.rsplit(" ", 1) for item in match.group(2).split(", "))
        stages[match.group(1)] = {stage: float(ms) / 1000 for stage, ms in figures.items()}
    return stages


def stage_budget(ledger: Ledger, study_uid: str) -> dict[str, float] | None:
    """The seconds of each stage of one study's trip (see the module's docstring), and ``total``;
    None while its SR has not been acknowledged. All clocks are this host's."""
    with ledger.reading() as session:
        sent = session.execute(
            select(OutboxEntry.sent_at, OutboxEntry.created_at).join(Result, Result.id == OutboxEntry.result_id)
            .where(Result.study_uid == study_uid, Result.kind == "SR", OutboxEntry.sent_at.is_not(None))
        ).first()
        if sent is None:
            return None
        study = session.get(Study, study_uid)
        start = session.get(AnalysisStart, study_uid)
        released = session.scalar(
            select(Association.released_at).join(Instance, Instance.association_id == Association.association_id)
            .where(Instance.study_uid == study_uid).order_by(Association.released_at.desc())
        )
        marks = [released, study.queued_at, start.started_at if start else None, study.analysed_at, sent.created_at,
                 sent.sent_at]
    if any(mark is None for mark in marks):
        return None
    seconds = [(later - earlier).total_seconds() for earlier, later in zip(marks, marks[1:])]
    return dict(zip(STAGES, seconds)) | {"total": (marks[-1] - marks[0]).total_seconds()}


def wait_budget(ledger: Ledger, study_uid: str, timeout: float = 300) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (budget := stage_budget(ledger, study_uid)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"study {study_uid} was not flagged within {timeout:.0f} s")
        time.sleep(0.05)
    return budget


def time_to_flag(work: Path, files: list[Path], burst: list[Path], senders: int, bundle: Path, broker: str,
                 pacs_kind: str, analysis_processes: int = 0) -> dict[str, list[dict[str, float]]]:
    """Stage budgets of the studies in ``files`` sent one at a time (the first, which warms the
    models, not counted) and of those in ``burst`` sent at once by ``senders`` senders."""
    pacs = OrthancPACS(work / "orthanc") if pacs_kind == "orthanc" else ReceivingPACS(work / "pacs").start()
    redis = RedisBroker(work / "redis") if broker == "redis" else None
    port = free_port()
    storage = work / "ttf-storage"
    settings: dict[str, object] = dict(
        ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=str(storage), model_bundle_dir=str(bundle),
        device="cpu", metrics_port=free_port(), analysis_processes=analysis_processes,
        destinations=[{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
    )
    if redis is not None:
        settings["broker_url"] = redis.url
    config = write_config(work / "ttf.toml", **settings)
    node = pleura("node", config, work / "ttf-node.log")
    worker = pleura("worker", config, work / "ttf-worker.log")
    ledger: Ledger | None = None
    results: dict[str, list[dict[str, float]]] = {"single": [], "burst": []}
    try:
        wait_port(port)
        ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")

        def study_of(path: Path) -> str:
            return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)

        for index, path in enumerate(files):
            subprocess.run([tool("storescu"), "-aec", "PLEURA", "127.0.0.1", str(port), str(path)], check=True,
                           capture_output=True)
            budget = wait_budget(ledger, study_of(path), timeout=600 if index == 0 else 300)
            if index > 0:  # the first analysis loads the models
                results["single"].append(budget)
        send_concurrently(port, "PLEURA", burst, senders)
        results["burst"] = [wait_budget(ledger, study_of(path)) for path in burst]
        inside = worker_stages(work / "ttf-worker.log")
        for name, paths in (("single", files[1:]), ("burst", burst)):
            for budget, path in zip(results[name], paths):
                budget.update(inside.get(ref(study_of(path)), {}))
    finally:
        stop(worker)
        stop(node)
        pacs.stop()
        if redis is not None:
            redis.stop()
        if ledger is not None:
            ledger.close()
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def print_budgets(name: str, budgets: list[dict[str, float]]) -> None:
    """p50 and p95 of the time to flag and of each stage, in ms, and each stage's share of the
    summed medians."""
    medians = {stage: percentile([b[stage] for b in budgets], 0.5) for stage in STAGES}
    whole = sum(medians.values()) or 1.0
    print(f"\n{name}: {len(budgets)} studies\n")
    print("| stage | p50 ms | p95 ms | share of the p50s |\n| --- | --- | --- | --- |")
    for stage in (*STAGES, "total"):
        values = [b[stage] for b in budgets]
        share = f"{100 * medians[stage] / whole:.0f} %" if stage != "total" else ""
        print(f"| {stage} | {1000 * percentile(values, 0.5):.0f} | {1000 * percentile(values, 0.95):.0f} | {share} |")
        if stage == "analysis":  # what the worker reported of it, stage by stage (work, not waiting)
            for inner in WORKER_STAGES:
                inner_values = [b.get(inner, 0.0) for b in budgets]
                if any(inner_values):
                    print(f"| &nbsp;&nbsp;{inner} | {1000 * percentile(inner_values, 0.5):.0f} | "
                          f"{1000 * percentile(inner_values, 0.95):.0f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of the ingest images")
    parser.add_argument("--studies", type=int, default=20, help="one-image studies sent one at a time")
    parser.add_argument("--burst", type=int, default=20, help="one-image studies sent at once by the senders")
    parser.add_argument("--flag-size", type=int, default=2048, help="rows and columns of the time-to-flag images")
    parser.add_argument("--broker", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--pacs", choices=("orthanc", "standin"), default="orthanc" if shutil.which("Orthanc") else "standin")
    parser.add_argument("--no-ingest", action="store_true", help="time to flag only")
    parser.add_argument("--analysis-processes", type=int, default=0, help="the worker's analysis_processes setting")
    parser.add_argument("--max-pdu", type=int, default=16384, help="largest PDU both receivers take (storescp's default)")
    parser.add_argument("--bundle", type=Path, default=Path.home() / ".local/share/pleura/models/demo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pleura-load-") as tmp:
        work = Path(tmp)
        figures = None
        if not args.no_ingest:
            files = make_files(work / "ingest-files", args.instances, args.size, per_study=10, seed=10_000)
            figures = ingest(work, files, args.senders, args.max_pdu)
        # One positive in twenty, as at a site; the first study warms the models.
        ttf_files = make_files(work / "ttf-files", args.studies + 1 + args.burst, args.flag_size, per_study=1,
                               seed=90_000, positive_every=20)
        flags = time_to_flag(work, ttf_files[: args.studies + 1], ttf_files[args.studies + 1 :], args.senders,
                             args.bundle, args.broker, args.pacs, args.analysis_processes)
    load = os.getloadavg()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU, Python {platform.python_version()}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average at the end {load[0]:.1f} / {load[1]:.1f}; "
          f"command: {' '.join(sys.argv)}\n")
    if figures is not None:
        print("| measure | pleura node | storescp (reference) | ratio |\n| --- | --- | --- | --- |")
        print(f"| instances/s ({figures['files']} x {args.size}x{args.size}, {args.senders} senders, max PDU {args.max_pdu}) | "
              f"{figures['node_rate']:.0f} | {figures['reference_rate']:.0f} | {figures['node_rate'] / figures['reference_rate']:.2f} |")
        print(f"| MB/s | {figures['node_mbps']:.1f} | {figures['reference_mbps']:.1f} | "
              f"{figures['node_mbps'] / figures['reference_mbps']:.2f} |")
        print("\nno instance lost or duplicated (checked in the ledger)")
    print(f"\ntime to flag, A-RELEASE to the SR acknowledged by the PACS ({args.pacs}), {args.broker} broker, "
          f"{args.flag_size} px images, demo bundle, CPU, analysis_processes {args.analysis_processes}:")
    print_budgets("one study at a time", flags["single"])
    print_budgets(f"burst from {args.senders} senders at once", flags["burst"])


if __name__ == "__main__":
    main()
