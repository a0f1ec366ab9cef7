"""Opening the ledger database and its transactions, on SQLite and on PostgreSQL.

SQLite is the default and is shared by several processes (the SCP, the export worker): it runs in
WAL mode with a busy timeout, and every transaction that may write takes the write lock up front so
that two writers never deadlock on a lock upgrade; read-only transactions (:meth:`LedgerSessions.reading`)
take none and read a snapshot, so the worklist, the API and the dispatcher's polling never wait for
the SCP's writes, nor hold them up (the engine and its SQLite settings: :mod:`node.ledger.engine`).
Opening a ledger creates a new database at the newest schema revision, or checks that an existing
one is at it (:mod:`node.ledger.migrations`): an older schema is upgraded only by ``pleura db upgrade``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.ledger.engine import READ_ONLY, display_url, make_database_private, open_engine
from node.ledger.migrations import ensure_schema
from node.ledger.schema import LedgerError

log = logging.getLogger(__name__)


class LedgerSessions:
    """The engine and the two kinds of transaction every ledger query runs in."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        self._display_url = display_url(url)
        self.engine: Engine = open_engine(url, echo=echo)
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Read-only transactions: the same pool, marked so that SQLite begins them deferred.
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        try:
            ensure_schema(self.engine)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise LedgerError(
                f"cannot open the ledger database {self._display_url} (PLEURA_DATABASE_URL): {exc}"
            ) from exc
        except LedgerError:
            self.engine.dispose()
            raise
        make_database_private(url)

    def __repr__(self) -> str:
        return f"Ledger({self._display_url!r})"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def taking_turns(self, key: int) -> Iterator[bool]:
        """Whether this process may do a round of work that several nodes sharing a PostgreSQL
        ledger must not do at once (dispatching settled studies): True while this process holds
        the advisory lock `key`, False when another holds it (skip the round; it will do it). The
        lock belongs to a connection held for the round, so a node that dies releases it. On
        SQLite (one host) always True."""
        if self._is_sqlite:
            yield True
            return
        with self.engine.connect() as connection:
            mine = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            connection.commit()
            try:
                yield mine
            finally:
                if mine:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction. On SQLite it begins deferred and reads a snapshot (WAL) without
        the write lock that every other transaction takes first; nothing may be written in it."""
        with self._read_sessions.begin() as session:
            yield session


def serialise(session: Session, key: int) -> None:
    """Make the rest of this transaction run alone among the ledger's users on PostgreSQL (an
    advisory lock released at commit), for work that reads and then writes on what it read and is
    done by every node sharing the ledger. On SQLite the write transaction already holds the lock."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
