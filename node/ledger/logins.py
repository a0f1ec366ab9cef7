"""Worklist log-ins: sessions kept in the ledger, so they survive a restart of the node and are
shared by every process serving the API (`pleura node`, `pleura worklist`, on several hosts).

Only a session cookie's SHA-256 is stored: whoever reads the ledger (a backup, say) cannot use it.
A session ends at its expiry, or when its user logs out; expired rows are removed as new ones open.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete

from node.ledger.schema import LoginSession, as_utc, utcnow
from node.ledger.sessions import LedgerSessions


@dataclass(frozen=True)
class LoginView:
    user: str
    role: str
    expires_at: datetime


class LoginLedger(LedgerSessions):
    """Open, look up and end worklist sessions by the SHA-256 of their cookie."""

    def open_login(
        self, session_sha256: str, user: str, role: str, *, lifetime_seconds: float, now: datetime | None = None
    ) -> LoginView:
        now = as_utc(now) if now else utcnow()
        expires_at = now + timedelta(seconds=lifetime_seconds)
        with self._transaction() as session:
            session.execute(delete(LoginSession).where(LoginSession.expires_at <= now))
            session.add(
                LoginSession(session_sha256=session_sha256, user=user, role=role, created_at=now, expires_at=expires_at)
            )
        return LoginView(user, role, expires_at)

    def login(self, session_sha256: str, *, now: datetime | None = None) -> LoginView | None:
        """The session's user and role, or None when there is no such session or it has expired."""
        now = as_utc(now) if now else utcnow()
        with self.reading() as session:
            row = session.get(LoginSession, session_sha256)
            if row is None or row.expires_at <= now:
                return None
            return LoginView(row.user, row.role, row.expires_at)

    def end_login(self, session_sha256: str) -> bool:
        """Log out: True when the session existed."""
        with self._transaction() as session:
            return bool(session.execute(delete(LoginSession).where(LoginSession.session_sha256 == session_sha256)).rowcount)
