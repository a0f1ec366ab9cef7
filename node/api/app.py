"""Builds the worklist application: the routers, the page, authentication and security headers."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from config.settings import Settings
from node.api.auth import Authenticator, LoginGuard
from node.api.limits import install_limits
from node.api.previews import PreviewRenderer
from node.api.routers import dicomweb, feedback, notifications, session, studies
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
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN; /openapi.json is the reference
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
    for module in (session, studies, feedback, notifications, dicomweb):
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

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
