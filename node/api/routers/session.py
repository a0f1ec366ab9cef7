"""Log in (token → session cookie for the page), who am I, log out."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status

from config.settings import Settings
from node.api.auth import (
    SESSION_COOKIE,
    Authenticator,
    Principal,
    current_principal,
    record_failure,
    record_login,
    refuse_if_throttled,
)
from node.api.deps import get_settings
from node.api.schemas import SessionIn, SessionOut
from node.ledger import UNDO_SECONDS

router = APIRouter(prefix="/api/session", tags=["session"])


def _out(principal: Principal, settings: Settings) -> SessionOut:
    return SessionOut(
        name=principal.name,
        role=principal.role,
        may_give_feedback=principal.may_give_feedback,
        refresh_seconds=settings.worklist_refresh_seconds,
        time_zone=settings.site_time_zone,
        aging_minutes=settings.worklist_aging_minutes,
        undo_seconds=UNDO_SECONDS,
    )


@router.post("", response_model=SessionOut, summary="Log in with a token; sets the session cookie")
def log_in(body: SessionIn, request: Request, response: Response, settings: Settings = Depends(get_settings)) -> SessionOut:
    auth: Authenticator = request.app.state.authenticator
    refuse_if_throttled(request)
    principal = auth.check_token(body.token)
    if principal is None:
        record_failure(request, "session")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown token")
    if principal.role == "sender":  # a system that stores by STOW-RS has no page to see
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {principal.name} may only send instances (STOW-RS)")
    record_login(request, principal)
    response.set_cookie(
        SESSION_COOKIE,
        auth.open_session(principal),
        max_age=int(auth.session_seconds),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return _out(principal, settings)


@router.get("", response_model=SessionOut, summary="Who is logged in")
def who_am_i(principal: Principal = Depends(current_principal), settings: Settings = Depends(get_settings)) -> SessionOut:
    return _out(principal, settings)


@router.delete("", status_code=status.HTTP_204_NO_CONTENT, summary="Log out")
def log_out(request: Request, response: Response) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        request.app.state.authenticator.close_session(cookie)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
