"""The health and metrics endpoint of a Pleura process, served by uvicorn in a thread:

- ``GET /healthz``: 200 while the process runs (Docker's HEALTHCHECK, a liveness probe);
- ``GET /readyz``: 200 when every dependency answers, else 503; the body names each check;
- ``GET /metrics``: Prometheus text format.

It carries no patient data, and serves on ``PLEURA_METRICS_HOST``/``PLEURA_METRICS_PORT``
(``PLEURA_WORKER_METRICS_PORT`` for a worker) in every deployment, whether or not the worklist
API runs.
"""

from __future__ import annotations

from celery import Celery
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from config.settings import Settings
from node.api.server import AppServer
from node.ledger import Ledger
from node.ops.health import Check, readiness_checks, run_checks
from node.ops.metrics import node_registry, worker_registry


def create_ops_app(checks: list[Check], registry: CollectorRegistry, role: str) -> FastAPI:
    app = FastAPI(title=f"Pleura {role}: health and metrics", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "role": role}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        report = run_checks(checks)
        return JSONResponse({"role": role, **report}, status_code=200 if report["ready"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class OpsServer(AppServer):
    thread_name = "pleura-ops"
    what = "the health and metrics endpoint"

    def __init__(
        self, app: FastAPI, host: str, port: int, settings_hint: str = "PLEURA_METRICS_PORT (PLEURA_METRICS_HOST)"
    ) -> None:
        self.settings_hint = settings_hint
        super().__init__(app, host, port)


def node_ops_server(settings: Settings, ledger: Ledger, celery_app: Celery) -> OpsServer:
    """`pleura node`'s endpoint: readiness of ledger, broker, storage (shared too) and model."""
    checks = readiness_checks(settings, ledger=ledger, celery_app=celery_app)
    app = create_ops_app(checks, node_registry(settings, ledger, celery_app), "node")
    return OpsServer(app, settings.metrics_host, settings.metrics_port)


def export_worker_ops_server(settings: Settings, ledger: Ledger, celery_app: Celery) -> OpsServer:
    """`pleura export-worker`'s endpoint: it needs the ledger, the broker and the storage."""
    checks = readiness_checks(settings, ledger=ledger, celery_app=celery_app, model=False)
    app = create_ops_app(checks, worker_registry(settings, celery_app), "export-worker")
    return OpsServer(app, settings.metrics_host, settings.metrics_port)


def worker_ops_server(settings: Settings, celery_app: Celery, port: int) -> OpsServer:
    """`pleura worker`'s endpoint: broker, storage (shared too) and its model, loaded and warm; no ledger."""
    checks = readiness_checks(settings, celery_app=celery_app, worker_model=True)
    app = create_ops_app(checks, worker_registry(settings, celery_app), "worker")
    return OpsServer(app, settings.metrics_host, port, "PLEURA_WORKER_METRICS_PORT (PLEURA_METRICS_HOST)")
