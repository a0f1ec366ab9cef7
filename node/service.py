"""The node as one service: SCP, settle loop, outbox sweeper, the export worker (a child process),
the notification loop and the worklist API and page.

:class:`NodeService` starts and stops the parts; :func:`run_node` runs it until SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from celery import Celery

from config.settings import CONFIG_FILE_ENV, ENV_PREFIX, Settings, StorageDirError
from node.dispatch import (
    PUBLISH_RETRY_POLICY,
    analysis_tasks_waiting,
    export_tasks_waiting,
    make_dispatcher,
    revoke_analysis,
)
from node.ledger import Ledger
from node.ops.server import node_ops_server
from node.periodic import PeriodicTask
from config.private_files import create_private_file, make_private_dirs, restrict_umask
from node.scp import StorageSCP
from node.settle import SettleLoop
from node.shared_storage import shared_storage_for, uploading_dispatcher
from node.storage import InstanceStore
from contract.tasks import DELIVER_RESULT
from contract.celery_app import make_celery
from node.notify.loop import NotificationLoop, Notifier

log = logging.getLogger(__name__)

def export_worker_args(settings: Settings) -> list[str]:
    """Celery's worker arguments for the export worker: the export queue, ``export_threads`` threads."""
    # fmt: off
    return [
        "worker", "-Q", "export", "-P", "threads", "-c", str(settings.export_threads),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", "export@%h", "--loglevel", "INFO",
    ]
    # fmt: on


def export_worker_command(settings: Settings) -> tuple[str, ...]:
    """The export worker as a child process of the node."""
    return (sys.executable, "-m", "celery", "-A", "node.celery_entry:app", *export_worker_args(settings))


HEALTHY_RUN_SECONDS = 60.0


def settings_environment(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with every setting as a ``PLEURA_*`` variable.

    A child process built from this environment loads exactly these settings, including values
    given as keyword overrides rather than read from the environment or the config file.
    """
    env = dict(os.environ if base is None else base)
    for name, value in settings.model_dump(mode="json").items():
        key = ENV_PREFIX + name.upper()
        if value is None:
            env.pop(key, None)
        elif isinstance(value, (list, dict)):
            env[key] = json.dumps(value)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        else:
            env[key] = str(value)
    return env


def make_delivery_enqueuer(celery_app: Celery) -> Callable[[int], None]:
    """enqueue(outbox_id): send DELIVER_RESULT for that outbox row by task name."""

    def enqueue_delivery(outbox_id: int) -> None:
        celery_app.send_task(DELIVER_RESULT, args=[outbox_id], retry=True, retry_policy=PUBLISH_RETRY_POLICY)

    return enqueue_delivery


class OutboxSweeper(PeriodicTask):
    """Re-enqueues deliveries whose message was lost: pending outbox rows overdue by `margin_seconds`."""

    thread_name = "pleura-outbox-sweeper"
    run_at_start = False

    def __init__(
        self,
        ledger: Ledger,
        enqueue: Callable[[int], None],
        *,
        interval_seconds: float = 30.0,
        margin_seconds: float = 60.0,
    ) -> None:
        super().__init__(interval_seconds)
        self.ledger = ledger
        self.enqueue = enqueue
        self.margin_seconds = margin_seconds

    def run_once(self, now: datetime | None = None) -> list[int]:
        """Enqueue every overdue row once; returns their ids."""
        overdue = self.ledger.requeue_overdue_outbox(self.margin_seconds, now=now)
        for outbox_id in overdue:
            try:
                self.enqueue(outbox_id)
            except Exception as exc:
                # The row stays pending and overdue again after another margin: nothing is lost.
                log.warning("cannot re-enqueue delivery of outbox row %d: %s", outbox_id, exc)
                return overdue
        if overdue:
            log.warning("re-enqueued %d overdue delivery(ies): %s", len(overdue), overdue)
        return overdue


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the node dies, however it dies
    (a SIGKILL leaves no chance to stop children), so a restarted node never finds a stale export
    worker beside its new one. Elsewhere nothing happens: the node's own stop() remains."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class ExportWorkerProcess:
    """The node-side Celery worker for the export queue, restarted when it dies.

    It runs in its own session, so a Ctrl-C meant for the node reaches the node, which then
    stops the worker (SIGTERM: Celery's warm shutdown, then SIGKILL after `stop_timeout`); and it
    is asked to end when the node dies (see :func:`_die_with_parent`).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        command: tuple[str, ...] | list[str],
        check_interval: float = 1.0,
        max_restart_delay: float = 30.0,
        stop_timeout: float = 30.0,
        log_file: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.log_file = log_file
        self.command = list(command)
        self.check_interval = check_interval
        self.max_restart_delay = max_restart_delay
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._started_at = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="pleura-export-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            output = open(self.log_file, "ab") if self.log_file is not None else None
            try:
                self._process = subprocess.Popen(
                    self.command,
                    env=self.env,
                    start_new_session=True,
                    stdout=output,
                    stderr=output,
                    preexec_fn=_die_with_parent,
                )
            finally:
                if output is not None:
                    output.close()  # the child holds its own descriptor
            self._started_at = time.monotonic()
            log.info("export worker started (pid %d)", self._process.pid)

    def _supervise(self) -> None:
        delay = 1.0
        while not self._stop.wait(self.check_interval):
            process = self._process
            if process is None or process.poll() is None:
                continue
            if time.monotonic() - self._started_at > HEALTHY_RUN_SECONDS:
                delay = 1.0  # it ran fine for a while: this is not a crash loop
            log.error(
                "export worker (pid %d) exited with status %s; restarting in %.0f s",
                process.pid,
                process.returncode,
                delay,
            )
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.max_restart_delay)
            self.restarts += 1
            try:
                self._spawn()
            except OSError as exc:
                log.error("cannot start the export worker: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.check_interval + 5)
            self._thread = None
        with self._lock:
            process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("export worker (pid %d) did not stop in %.0f s; killing it", process.pid, self.stop_timeout)
            process.kill()
            process.wait(10)
        log.info("export worker stopped")


class NodeService:
    """Everything `pleura node` runs, with start() and stop() so it can be run and tested."""

    def __init__(
        self,
        settings: Settings,
        *,
        export_worker: bool = True,
        config_file: Path | None = None,
        celery_app: Celery | None = None,
        settle_interval_seconds: float = 0.5,
        sweep_interval_seconds: float = 30.0,
        sweep_margin_seconds: float = 60.0,
        export_worker_log: Path | None = None,
        worklist: bool = True,
        notify_interval_seconds: float = 2.0,
    ) -> None:
        self.settings = settings
        self.worklist_enabled = worklist
        self.notify_interval_seconds = notify_interval_seconds
        self.notify_loop: PeriodicTask | None = None
        self.worklist: Any = None  # node.api.server.WorklistServer, imported only when it runs
        self.export_worker_log = export_worker_log
        self.export_worker_enabled = export_worker
        self.config_file = config_file
        self.celery_app = celery_app
        self.settle_interval_seconds = settle_interval_seconds
        self.sweep_interval_seconds = sweep_interval_seconds
        self.sweep_margin_seconds = sweep_margin_seconds
        self.ledger: Ledger | None = None
        self.store: InstanceStore | None = None
        self.scp: StorageSCP | None = None
        self.settle_loop: SettleLoop | None = None
        self.sweeper: OutboxSweeper | None = None
        self.export_worker: ExportWorkerProcess | None = None
        self.ops: Any = None  # node.ops.server.OpsServer: /healthz, /readyz, /metrics

    def start(self) -> None:
        """Start every part; on failure, stop what was started and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        settings = self.settings
        try:
            make_private_dirs(settings.storage_dir)
            if settings.embedded_broker:
                # Made here, 0600, before kombu creates it with the umask's mode.
                create_private_file(settings.embedded_broker_file)
        except OSError as exc:
            raise StorageDirError.from_os_error(settings.storage_dir, exc) from exc
        self.ledger = Ledger(settings.ledger_url)
        self.store = InstanceStore(settings.storage_dir)
        if self.celery_app is None:
            self.celery_app = make_celery(settings)
        app = self.celery_app

        if self.export_worker_enabled:
            env = settings_environment(settings)
            if self.config_file is not None:
                env[CONFIG_FILE_ENV] = str(Path(self.config_file).resolve())
            # JSON logs: no start-up banner, which Celery prints as plain text
            command = export_worker_command(settings)
            if settings.log_format == "json":  # a global option of `celery`: before "worker"
                at = command.index("worker")
                command = (*command[:at], "--quiet", *command[at:])
            self.export_worker = ExportWorkerProcess(env, command=command, log_file=self.export_worker_log)
            self.export_worker.start()

        # Health and metrics first, so an orchestrator sees the node as soon as it runs.
        self.ops = node_ops_server(settings, self.ledger, app)
        self.ops.start()

        dispatch = make_dispatcher(app)
        shared = shared_storage_for(settings)
        if shared is not None:  # many hosts: the workers read the instances from the shared storage
            dispatch = uploading_dispatcher(shared, self.store, dispatch)
        self.settle_loop = SettleLoop(
            self.ledger,
            dispatch,
            settings.settle_seconds,
            interval_seconds=self.settle_interval_seconds,
            analysis_timeout_seconds=settings.analysis_timeout_seconds,
            tasks_waiting=lambda: analysis_tasks_waiting(app),
            lease_seconds=settings.analysis_lease_seconds,
            export_waiting=lambda: export_tasks_waiting(app),
            revoke=lambda task_id: revoke_analysis(app, task_id),
            grace_seconds=settings.settle_grace_ms / 1000,
        )
        self.settle_loop.start()

        self.sweeper = OutboxSweeper(
            self.ledger,
            make_delivery_enqueuer(app),
            interval_seconds=self.sweep_interval_seconds,
            margin_seconds=self.sweep_margin_seconds,
        )
        self.sweeper.start()
        self._start_worklist()

        # Last, so the node accepts instances only once everything behind the SCP runs.
        self.scp = StorageSCP(settings, self.ledger, self.store, on_released=self.settle_loop.association_released)
        self.scp.start()
        log.info(
            "node started: storage %s, ledger %s, broker %s, shared storage %s",
            settings.storage_dir,
            self.ledger,
            "embedded" if settings.embedded_broker else "external",
            shared.url if shared is not None else "none (one host)",
        )

    def _start_worklist(self) -> None:
        """The notification loop (HL7, webhooks) and, when API users are configured, the worklist
        API and page."""
        assert self.ledger is not None
        self.notify_loop = NotificationLoop(Notifier(self.settings, self.ledger), interval_seconds=self.notify_interval_seconds)
        self.notify_loop.start()
        if not self.worklist_enabled:
            return
        if not self.settings.api_users:
            log.info("worklist API and page off: no PLEURA_API_USERS configured")
            return
        from node.api.server import WorklistServer  # FastAPI and uvicorn: only when API users are configured

        self.worklist = WorklistServer(self.settings, self.ledger)
        self.worklist.start()

    def stop(self) -> None:
        """Stop receiving first, then the worklist and the loops, then the export worker. Safe to call twice."""
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self.worklist is not None:
            self.worklist.stop()
            self.worklist = None
        if self.notify_loop is not None:
            self.notify_loop.stop()
            self.notify_loop = None
        if self.settle_loop is not None:
            self.settle_loop.stop()
            self.settle_loop = None
        if self.sweeper is not None:
            self.sweeper.stop()
            self.sweeper = None
        if self.export_worker is not None:
            self.export_worker.stop()
            self.export_worker = None
        if self.ops is not None:
            self.ops.stop()
            self.ops = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def __enter__(self) -> NodeService:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_node(settings: Settings, *, export_worker: bool = True, config_file: Path | None = None) -> None:
    """Run the node until SIGTERM or SIGINT, then stop it cleanly (the export worker too)."""
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    # Once, for the whole process: what libraries create is private too (config/private_files.py).
    restrict_umask()
    service = NodeService(settings, export_worker=export_worker, config_file=config_file)
    try:
        service.start()
        while not stop_requested.wait(1.0):
            pass
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
