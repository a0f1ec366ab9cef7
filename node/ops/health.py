"""Readiness: can this process do its work? Each check names a dependency and either returns a
short detail or raises; :func:`run_checks` runs them in parallel, each bounded in time, so a
hung database or broker makes ``/readyz`` answer "not ready" instead of hanging."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import text

from config.secrets import mask_text
from config.settings import Settings
from contract.active import RegistryLayout, active_bundle_dir, worker_reports_root
from contract.bundle import load_bundle
from node.ledger import Ledger
from node.shared_storage import shared_storage_for

CHECK_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[], str]


def check_ledger(ledger: Ledger) -> str:
    with ledger.reading() as session:
        session.execute(text("SELECT 1"))
    return repr(ledger)


def check_broker(celery_app: Celery) -> str:
    """Connect to the broker once, without Celery's endless retries."""
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT_SECONDS)
        return connection.as_uri()  # the password is masked


def check_storage(settings: Settings) -> str:
    """The storage directory takes a new file (exists, writable, not read-only mounted)."""
    with tempfile.NamedTemporaryFile(dir=settings.storage_dir, prefix=".pleura-ready-") as probe:
        probe.write(b"ok")
        probe.flush()
        os.fsync(probe.fileno())
    return str(settings.storage_dir)


def check_shared_storage(settings: Settings) -> str:
    shared = shared_storage_for(settings)
    return shared.check() if shared is not None else "not used (one host)"


def check_model(settings: Settings) -> str:
    return load_bundle(active_bundle_dir(settings)).identity.label


def check_worker_model(settings: Settings, pid: int | None = None) -> str:
    """A worker's models are warm: read from its status reports (worker/active_model.py), those of
    process ``pid`` (default: this one) and of its pool's processes. Raises while a model is
    warming, or before the worker reported any."""
    pid = pid or os.getpid()
    host = f"{socket.gethostname()}-"
    reports = [
        report for report in RegistryLayout(worker_reports_root(settings)).workers()
        if str(report.get("worker", "")).startswith(host) and pid in (report.get("pid"), report.get("ppid"))
    ]
    if not reports:
        raise RuntimeError("no model loaded yet: the worker is starting")
    for report in reports:
        if report.get("state") != "ready":
            error = f" (last error: {report['error']})" if report.get("error") else ""
            raise RuntimeError(f"warming the {report.get('kind')} model {report.get('warming') or ''}{error}".strip())
    return "; ".join(
        f"{report.get('kind')}: {report.get('loaded')}"
        + (f" (warming {report['warming']} beside it)" if report.get("warming") else "")
        for report in sorted(reports, key=lambda item: (str(item.get("kind")), str(item.get("worker"))))
    )


def readiness_checks(
    settings: Settings,
    *,
    ledger: Ledger | None = None,
    celery_app: Celery | None = None,
    model: bool = True,
    worker_model: bool = False,
) -> list[Check]:
    """The checks of a process: the ledger when it uses one (node, export worker; a worker does
    not), the broker, the storage directory, the shared storage, and the model bundle (a worker's:
    loaded and warm, :func:`check_worker_model`)."""
    checks: list[Check] = []
    if ledger is not None:
        checks.append(Check("ledger", lambda: check_ledger(ledger)))
    if celery_app is not None:
        checks.append(Check("broker", lambda: check_broker(celery_app)))
    checks.append(Check("storage", lambda: check_storage(settings)))
    if settings.shared_storage_url:
        checks.append(Check("shared_storage", lambda: check_shared_storage(settings)))
    if worker_model:
        checks.append(Check("model", lambda: check_worker_model(settings)))
    elif model:
        checks.append(Check("model", lambda: check_model(settings)))
    return checks


_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pleura-readyz")


def run_checks(checks: list[Check], timeout: float = CHECK_TIMEOUT_SECONDS) -> dict[str, Any]:
    """``{"ready": bool, "checks": {name: {"ok": bool, "detail": str}}}``; a check that raises or
    takes longer than `timeout` fails with the reason."""
    futures = {check.name: _pool.submit(check.run) for check in checks}
    wait(futures.values(), timeout=timeout)
    results: dict[str, dict[str, Any]] = {}
    for name, future in futures.items():
        if not future.done():
            results[name] = {"ok": False, "detail": f"no answer within {timeout:.0f} s"}
            continue
        try:
            results[name] = {"ok": True, "detail": mask_text(str(future.result()))}
        except Exception as exc:
            results[name] = {"ok": False, "detail": mask_text(f"{type(exc).__name__}: {exc}")[:500]}
    return {"ready": all(entry["ok"] for entry in results.values()), "checks": results}
