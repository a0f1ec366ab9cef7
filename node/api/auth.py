"""Who is calling: a bearer token (systems, scripts) or a session cookie (the page, after logging
in with the same token). Two roles: ``read`` sees the worklist, ``feedback`` also gives verdicts."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request, status

from config.settings import ApiUser

SESSION_COOKIE = "pleura_session"
SESSION_SECONDS = 12 * 3600


@dataclass(frozen=True)
class Principal:
    name: str
    role: str

    @property
    def may_give_feedback(self) -> bool:
        return self.role == "feedback"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Authenticator:
    """Checks tokens against the configured users and keeps the page's sessions (in memory: a
    restarted node asks people to log in again)."""

    def __init__(self, users: list[ApiUser], session_seconds: float = SESSION_SECONDS) -> None:
        self._users = [(user.token_sha256 or _digest(user.token or ""), user) for user in users]
        self.session_seconds = session_seconds
        self._sessions: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    def check_token(self, token: str) -> Principal | None:
        digest = _digest(token)
        found = None
        for expected, user in self._users:  # compare with every user: the time says nothing
            if hmac.compare_digest(expected, digest):
                found = Principal(user.name, user.role)
        return found

    def open_session(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[session_id] = (principal, now + self.session_seconds)
        return session_id

    def session(self, session_id: str) -> Principal | None:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or entry[1] <= time.monotonic():
                self._sessions.pop(session_id, None)
                return None
            return entry[0]

    def close_session(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)


def current_principal(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer <token>` or the session cookie; 401 otherwise."""
    auth: Authenticator = request.app.state.authenticator
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        principal = auth.check_token(header[7:].strip())
        if principal is not None:
            return principal
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        principal = auth.session(cookie)
        if principal is not None:
            return principal
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED, "log in, or send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
    )


def require_feedback_role(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.may_give_feedback:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {principal.name} may read but not give feedback")
    return principal
