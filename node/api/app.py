"""Builds the worklist application: the routers, the page, authentication and security headers."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from config.settings import Settings
from node.api.auth import Authenticator, LoginGuard
from node.api.context import StudyContext
from node.api.limits import install_limits
from node.api.previews import PreviewRenderer
from node.api.routers import dicomweb, events, feedback, images, notifications, session, studies, verdicts
from node.audit import AuditTrail
from node.ledger import Ledger
from node.receive import Receiver
from node.storage import InstanceStore

STATIC_DIR = Path(__file__).resolve().parent.parent / "web" / "static"

# The page loads nothing from elsewhere (it works offline); previews are fetched from the API.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def create_app(settings: Settings, ledger: Ledger) -> FastAPI:
    app = FastAPI(
        title="Pleura worklist API",
        version="1",
        description=(
            "Studies received by the Pleura node, sorted by urgency (suspected pneumothorax first), with "
            "image previews, radiologists' feedback and its export, and the notifications sent. Every "
            "endpoint needs `Authorization: Bearer <token>` or the session cookie set by `POST /api/session`. "
            "URLs name studies by an opaque reference, never by a UID or a patient identifier. "
            "`POST /dicomweb/studies` is the STOW-RS service, for users of the `sender` role only."
        ),
        docs_url=None,  # FastAPI's pages load Swagger UI from a CDN: /api/docs serves a packaged copy
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.ledger = ledger
    app.state.authenticator = Authenticator(settings.api_users, ledger, settings.api_session_hours * 3600)
    app.state.login_guard = LoginGuard(settings.api_login_max_failures, settings.api_login_window_seconds)
    app.state.audit = AuditTrail(settings.storage_dir)
    app.state.previews = PreviewRenderer(settings.storage_dir)
    # STOW-RS goes through the SCP's receive path: the same checks, durable store and ledger.
    app.state.receiver = Receiver(settings, ledger, InstanceStore(settings.storage_dir), audit=app.state.audit)
    app.state.context = StudyContext(InstanceStore(settings.storage_dir), settings.site_time_zone)
    for module in (session, studies, images, verdicts, feedback, notifications, dicomweb, events):
        app.include_router(module.router)
    # Before the security headers, so the routes read the body through the limit directly
    # (BaseHTTPMiddleware would wrap its 413 in a task group's ExceptionGroup); that middleware
    # reads no body itself.
    install_limits(
        app, max_body_bytes=settings.api_max_body_bytes, max_upload_bytes=settings.api_max_upload_bytes,
        max_stow_bytes=settings.stow_max_request_bytes,
    )

    @app.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if request.url.path.startswith("/api/") and "Cache-Control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/api/docs", include_in_schema=False)
    def api_docs() -> HTMLResponse:
        """Swagger UI 5 (it reads OpenAPI 3.1) from the fastapi-offline package's files, started by
        a file of ours (no inline script: the Content-Security-Policy allows none)."""
        return HTMLResponse(SWAGGER_PAGE)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/api/docs/assets", StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")
    return app


SWAGGER_UI_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

SWAGGER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pleura worklist API</title>
<link rel="stylesheet" href="/api/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/api/docs/assets/swagger-ui-bundle.js"></script>
<script src="/static/api-docs.js"></script></body></html>
"""
