"""Worker recovery benchmark: how long a study waits after its worker is killed (SIGKILL) mid-task
before a worker analyses it again, on the embedded broker and on Redis.

    .venv/bin/python benchmarks/worker_recovery.py [--images 30] [--rounds 3]

Each round: `pleura node` and `pleura worker` (CPU, demo bundle, every setting at its default, so
`analysis_lease_seconds` 20 and `analysis_timeout_seconds` 3600), one study of synthetic 512-px
radiographs sent with storescu; once the ledger says a worker started on it, the worker's process
group is killed and a new worker started at once. Recovery is the time from the kill to the
ledger's next "analysis started" of the study. The reference, measured in the same run, is the
time the new worker takes from its start to being ready (it bounds recovery from below when the
worker is restarted, as a supervisor would); the ratio against the analysis timeout says what the
lease saves. Results go to stdout as a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from load import free_port, make_files, pleura, stop, tool, wait_port, write_config  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from pleura.pacs_standin import ReceivingPACS  # noqa: E402

DEADLINE = 600.0


def wait(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def worker_ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def one_round(work: Path, files: list[Path], bundle: Path, broker_url: str | None) -> tuple[float, float]:
    """(recovery seconds, the new worker's start-to-ready seconds)."""
    port, metrics = free_port(), free_port()
    pacs = ReceivingPACS(work / "pacs").start()
    values: dict[str, object] = dict(
        ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=str(work / "storage"), model_bundle_dir=str(bundle),
        device="cpu", settle_seconds=1.0, worker_metrics_port=metrics, metrics_port=free_port(),
        destinations=[{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}],
    )
    if broker_url:
        values["broker_url"] = broker_url
    config = write_config(work / "pleura.toml", **values)
    node = pleura("node", config, work / "node.log")
    workers = [pleura("worker", config, work / "worker-1.log")]
    ledger = None
    try:
        wait_port(port)
        subprocess.run([tool("storescu"), "-aet", "BENCH", "-aec", "PLEURA", "127.0.0.1", str(port), *map(str, files)],
                       check=True, capture_output=True)
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        ledger = Ledger(f"sqlite:///{work / 'storage' / 'ledger.sqlite'}")
        wait(lambda: ledger.analysis_started_at(study_uid) is not None, "the first analysis to start")
        os.killpg(workers[0].pid, signal.SIGKILL)
        killed = datetime.now(timezone.utc)
        workers[0].wait(10)
        started = time.monotonic()
        workers.append(pleura("worker", config, work / "worker-2.log"))
        wait(lambda: worker_ready(metrics), "the new worker to be ready")
        ready = time.monotonic() - started
        wait(lambda: (ledger.analysis_started_at(study_uid) or killed) > killed, "the study to be analysed again")
        recovery = (datetime.now(timezone.utc) - killed).total_seconds()
        return recovery, ready
    finally:
        if ledger is not None:
            ledger.close()
        for process in workers + [node]:
            stop(process)
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30, help="radiographs in the study (enough to be killed mid-task)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from config.settings import Settings, default_storage_dir

    bundle = Path(os.environ.get("PLEURA_MODEL_BUNDLE_DIR") or os.environ.get("PLEURA_MODEL_DIR")
                  or default_storage_dir() / "models" / "demo")
    defaults = Settings()
    with tempfile.TemporaryDirectory(prefix="pleura-recovery-") as temp:
        root = Path(temp)
        files = make_files(root / "files", args.images, 512, args.images, seed=4100)
        redis_port = free_port()
        redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
                                  "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(root)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = []
        try:
            wait_port(redis_port)
            for broker, url in (("embedded", None), ("Redis", f"redis://127.0.0.1:{redis_port}/0")):
                for index in range(args.rounds):
                    work = root / f"{broker}-{index}"
                    work.mkdir()
                    recovery, ready = one_round(work, files, bundle, url)
                    rows.append((broker, recovery, ready))
                    print(f"{broker} round {index + 1}: recovered in {recovery:.1f} s (new worker ready in {ready:.1f} s)",
                          file=sys.stderr)
        finally:
            redis.terminate()
            redis.wait(10)
    load = os.getloadavg()
    print(f"\n{platform.node()}, {os.cpu_count()} cores, {datetime.now(timezone.utc):%Y-%m-%d}, "
          f"load {load[0]:.2f} {load[1]:.2f}; lease {defaults.analysis_lease_seconds:.0f} s, "
          f"analysis timeout {defaults.analysis_timeout_seconds:.0f} s\n")
    print("| broker | kill → analysed again, s (each round) | new worker start → ready, s | recovery / analysis timeout |")
    print("| --- | --- | --- | --- |")
    for broker in ("embedded", "Redis"):
        mine = [row for row in rows if row[0] == broker]
        recoveries = ", ".join(f"{row[1]:.1f}" for row in mine)
        readies = ", ".join(f"{row[2]:.1f}" for row in mine)
        worst = max(row[1] for row in mine)
        print(f"| {broker} | {recoveries} | {readies} | {worst / defaults.analysis_timeout_seconds:.4f} |")


if __name__ == "__main__":
    main()
