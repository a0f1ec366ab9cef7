"""Who is calling: a bearer token (systems, scripts) or a session cookie (the page, after logging
in with the same token). Three roles: ``read`` sees the worklist, ``feedback`` also gives verdicts, ``sender`` only stores
instances by STOW-RS (``node/api/routers/dicomweb.py``) and sees nothing.

Guessing is slowed and recorded: :class:`LoginGuard` counts wrong tokens per client address (at
the log-in and in ``Authorization`` headers alike) and, after ``api_login_max_failures`` within
``api_login_window_seconds``, answers 429 with ``Retry-After`` without checking the token. Every
log-in and every wrong token goes into the audit trail (``node/audit.py``): the user's name for a
log-in, the client address for a failure, never any part of the token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from config.callers import MIN_TOKEN_CHARS, ApiUser
from node.audit import AuditTrail
from node.ledger import Ledger

log = logging.getLogger(__name__)

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
    """Checks tokens against the configured users and keeps the page's sessions in the ledger
    (node/ledger/logins.py): a restarted node, or another process serving the API on the same
    ledger, knows them; each ends after `session_seconds` (``api_session_hours``) or at log-out."""

    def __init__(self, users: list[ApiUser], ledger: Ledger, session_seconds: float = SESSION_SECONDS) -> None:
        self._users = [(user.token_sha256 or _digest(user.token or ""), user) for user in users]
        self._roles = {user.name: user.role for user in users}
        self.ledger = ledger
        self.session_seconds = session_seconds

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    def check_token(self, token: str) -> Principal | None:
        """The user whose token this is; None for a wrong one, and for any token shorter than
        MIN_TOKEN_CHARS (a hashed token's strength cannot be checked when configured)."""
        if len(token) < MIN_TOKEN_CHARS:
            return None
        digest = _digest(token)
        found = None
        for expected, user in self._users:  # compare with every user: the time says nothing
            if hmac.compare_digest(expected, digest):
                found = Principal(user.name, user.role)
        return found

    def open_session(self, principal: Principal) -> str:
        session_id = secrets.token_urlsafe(32)
        self.ledger.open_login(
            _digest(session_id), principal.name, principal.role, lifetime_seconds=self.session_seconds
        )
        return session_id

    def session(self, session_id: str) -> Principal | None:
        """The session's user, or None when it is unknown, expired, or its user is no longer
        configured; a user whose role changed gets the configured role, not the one logged in with."""
        login = self.ledger.login(_digest(session_id))
        if login is None or login.user not in self._roles:
            return None
        return Principal(login.user, self._roles[login.user])

    def close_session(self, session_id: str) -> None:
        self.ledger.end_login(_digest(session_id))


class LoginGuard:
    """Wrong tokens per client address in a sliding window; a client with `max_failures` of them
    within `window_seconds` is refused until the oldest leaves the window. Kept in memory (unlike the
    sessions): a restart forgets it, and each process behind a load balancer counts its own."""

    def __init__(self, max_failures: int, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures.get(client, deque())
        while failures and failures[0] <= now - self.window_seconds:
            failures.popleft()
        if failures:
            self._failures[client] = failures
        else:
            self._failures.pop(client, None)
        return failures

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it may now."""
        with self._lock:
            now = self._clock()
            failures = self._recent(client, now)
            if len(failures) < self.max_failures:
                return 0
            return max(1, math.ceil(failures[-self.max_failures] + self.window_seconds - now))

    def failed(self, client: str) -> bool:
        """Count a wrong token; True when this one reached the limit (the client is now refused)."""
        with self._lock:
            now = self._clock()
            failures = self._recent(client, now)
            failures.append(now)
            self._failures[client] = failures
            # A deque per address, bounded: more than the limit changes nothing.
            while len(failures) > self.max_failures:
                failures.popleft()
            return len(failures) == self.max_failures


def client_address(request: Request) -> str:
    """The peer's address as the server sees it (a reverse proxy's own, behind one)."""
    return request.client.host if request.client else "unknown"


def refuse_if_throttled(request: Request) -> None:
    """429 with Retry-After while the caller's address has too many recent wrong tokens."""
    guard: LoginGuard = request.app.state.login_guard
    wait = guard.retry_after(client_address(request))
    if wait:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many wrong tokens from this address; try again in {wait} s (PLEURA_API_LOGIN_MAX_FAILURES)",
            {"Retry-After": str(wait)},
        )


def record_failure(request: Request, via: str) -> None:
    """Count and audit a wrong token: the client address and how it came, no token material."""
    client = client_address(request)
    now_refused = request.app.state.login_guard.failed(client)
    audit: AuditTrail = request.app.state.audit
    audit.record("api_login_failed", client=client, via=via)
    log.warning("wrong API token from %s (%s)", client, via)
    if now_refused:
        audit.record("api_login_throttled", client=client, window_seconds=request.app.state.login_guard.window_seconds)
        log.warning("API log-ins from %s refused for a while: too many wrong tokens", client)


def record_access(request: Request, principal: Principal, event: str, **fields: object) -> None:
    """Audit what a user saw or did (a study's detail, a preview, a verdict): who, from where, and
    which study (its UID: the audit trail is kept with the data, the logs never see it)."""
    request.app.state.audit.record(
        event, user=principal.name, role=principal.role, client=client_address(request), **fields
    )


def record_login(request: Request, principal: Principal) -> None:
    request.app.state.audit.record(
        "api_login", user=principal.name, role=principal.role, client=client_address(request)
    )
    log.info("API user %s logged in", principal.name)


# Declared for the OpenAPI document (its security schemes); the checks are current_principal's own.
BEARER_SCHEME = HTTPBearer(auto_error=False, scheme_name="bearer", description="a user's token (`pleura api-token`)")
COOKIE_SCHEME = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, scheme_name="session", description="set by POST /api/session (the page)"
)


def _from_header(request: Request) -> Principal | None:
    """The user of `Authorization: Bearer <token>` or, for systems that can send only that (an
    archive's DICOMweb client), `Basic` with the user's name and token; None without either. A
    wrong token is counted (429 once there are too many from the address)."""
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        token = credentials.strip()
    elif scheme.lower() == "basic":
        try:
            token = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            token = ""
    else:
        return None
    refuse_if_throttled(request)
    principal = request.app.state.authenticator.check_token(token)
    if principal is None:
        record_failure(request, scheme.lower())
    return principal


def _authenticated(request: Request) -> Principal:
    auth: Authenticator = request.app.state.authenticator
    principal = _from_header(request)
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


def current_principal(
    request: Request,
    _bearer: HTTPAuthorizationCredentials | None = Depends(BEARER_SCHEME),
    _cookie: str | None = Depends(COOKIE_SCHEME),
) -> Principal:
    """The caller, from `Authorization: Bearer <token>` or the session cookie; 401 otherwise (429
    while its address has too many recent wrong tokens), 403 for a ``sender``, who may only send."""
    principal = _authenticated(request)
    if principal.role == "sender":
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {principal.name} may only send instances (STOW-RS)")
    return principal


def require_sender_role(request: Request) -> Principal:
    """A ``sender`` (STOW-RS), by bearer token or HTTP Basic with the user's name and token."""
    principal = _authenticated(request)
    if principal.role != "sender":
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {principal.name} is not a sender (role {principal.role})")
    return principal


def require_feedback_role(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.may_give_feedback:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"user {principal.name} may read but not give feedback")
    return principal
