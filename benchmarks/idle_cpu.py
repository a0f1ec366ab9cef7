"""Idle CPU of the embedded broker's polling: an idle `pleura node` (with its export worker) and
`pleura worker`, CPU time over a quiet minute at each `broker_polling_ms`.

    .venv/bin/python benchmarks/idle_cpu.py [--seconds 60] [--polling-ms 1000 50]

Each run starts node and worker on a fresh storage directory (demo bundle, CPU, embedded broker),
waits for the worker to be ready and ten seconds more, then sums utime+stime (/proc/<pid>/stat)
of every process in both process groups over `--seconds`. Results go to stdout as a Markdown table
for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from load import free_port, pleura, stop, wait_port, write_config  # noqa: E402
from worker_recovery import wait, worker_ready  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(groups: set[int]) -> float:
    """utime+stime of every live process whose process group is one of `groups`."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # pgrp; utime and stime are fields 14 and 15 of stat
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def one_run(work: Path, bundle: Path, polling_ms: int, seconds: float) -> float:
    """CPU seconds per wall second of an idle node and worker."""
    port, metrics = free_port(), free_port()
    config = write_config(
        work / "pleura.toml", ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=str(work / "storage"),
        model_bundle_dir=str(bundle), device="cpu", worker_metrics_port=metrics, metrics_port=free_port(),
        broker_polling_ms=polling_ms,
    )
    node = pleura("node", config, work / "node.log")
    worker = pleura("worker", config, work / "worker.log")
    try:
        wait_port(port)
        wait(lambda: worker_ready(metrics), "the worker to be ready")
        time.sleep(10)
        groups = {node.pid, worker.pid}
        before, started = group_cpu_seconds(groups), time.monotonic()
        time.sleep(seconds)
        return (group_cpu_seconds(groups) - before) / (time.monotonic() - started)
    finally:
        stop(worker)
        stop(node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--polling-ms", type=int, nargs="+", default=[1000, 50])
    args = parser.parse_args()
    from config.settings import default_storage_dir

    bundle = Path(os.environ.get("PLEURA_MODEL_BUNDLE_DIR") or os.environ.get("PLEURA_MODEL_DIR")
                  or default_storage_dir() / "models" / "demo")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pleura-idle-") as temp:
        for polling_ms in args.polling_ms:
            work = Path(temp) / str(polling_ms)
            work.mkdir()
            share = one_run(work, bundle, polling_ms, args.seconds)
            rows.append((polling_ms, share))
            print(f"broker_polling_ms {polling_ms}: {share * 100:.2f} % of one core", file=sys.stderr)
    load = os.getloadavg()
    print(f"\n{platform.node()}, {os.cpu_count()} cores, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"load {load[0]:.2f} {load[1]:.2f}; idle node + export worker + worker, {args.seconds:.0f} s each\n")
    print("| broker_polling_ms | CPU, % of one core |")
    print("| --- | --- |")
    for polling_ms, share in rows:
        print(f"| {polling_ms} | {share * 100:.2f} |")


if __name__ == "__main__":
    main()
