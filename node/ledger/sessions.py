"""Opening the ledger database and its transactions, on SQLite and on PostgreSQL.

SQLite is the default and is shared by several processes (the SCP, the export worker): it runs in
WAL mode with a busy timeout, and every transaction that may write takes the write lock up front so
that two writers never deadlock on a lock upgrade; read-only transactions (:meth:`LedgerSessions.reading`)
take none and read a snapshot, so the worklist, the API and the dispatcher's polling never wait for
the SCP's writes, nor hold them up. On PostgreSQL the schema is created under an advisory lock, so
processes that open a new database together do not collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.ledger.schema import Base, LedgerError
from node.private_files import make_private

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "pleura_read_only"
"""Execution option of the connections of :meth:`Ledger.reading` (a plain BEGIN on SQLite)."""


class LedgerSessions:
    """The engine and the two kinds of transaction every ledger query runs in."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self._display_url = parsed.render_as_string(hide_password=True)
        self._is_sqlite = parsed.get_backend_name() == "sqlite"
        if self._is_sqlite and parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise LedgerError(
                    f"ledger database {self._display_url}: folder {folder} does not exist "
                    "(check PLEURA_DATABASE_URL or PLEURA_STORAGE_DIR)"
                )
        try:
            self.engine: Engine = create_engine(url, echo=echo, pool_pre_ping=not self._is_sqlite)
        except (SQLAlchemyError, ImportError) as exc:
            raise LedgerError(f"ledger database {self._display_url} (PLEURA_DATABASE_URL): {exc}") from exc
        if self._is_sqlite:
            event.listen(self.engine, "connect", sqlite_on_connect)
            event.listen(self.engine, "begin", sqlite_on_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Read-only transactions: the same pool, marked so that SQLite begins them deferred.
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        try:
            create_schema(self.engine)
        except SQLAlchemyError as exc:
            raise LedgerError(
                f"cannot open the ledger database {self._display_url} (PLEURA_DATABASE_URL): {exc}"
            ) from exc
        if self._is_sqlite and parsed.database and parsed.database != ":memory:":
            # It holds patient IDs: its owner's only. SQLite gives the -wal and -shm it makes
            # later the database file's mode (node/private_files.py).
            database = Path(parsed.database).expanduser()
            for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))):
                if path.exists():
                    make_private(path)

    def __repr__(self) -> str:
        return f"Ledger({self._display_url!r})"

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction. On SQLite it begins deferred and reads a snapshot (WAL) without
        the write lock that every other transaction takes first; nothing may be written in it."""
        with self._read_sessions.begin() as session:
            yield session


SCHEMA_LOCK_KEY = 0x504C4555  # "PLEU": the advisory lock that serialises schema changes on PostgreSQL


def create_schema(engine: Engine) -> None:
    """Create the missing tables and columns, once, even when several processes start together.

    The node and its export worker (and, on several hosts, more processes) open the ledger at the
    same moment on a new database. PostgreSQL's CREATE TABLE is not safe against a concurrent one
    (a duplicate-key error on its catalogue), so there the work runs under a transaction-level
    advisory lock; SQLite serialises writers itself.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            Base.metadata.create_all(connection)
            add_missing_columns(connection)
        return
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        add_missing_columns(connection)


def add_missing_columns(connection: Connection) -> None:
    """Add the nullable columns a newer Pleura defines to a ledger an older one created.

    ``create_all`` makes missing tables but never alters existing ones; every column added since
    the first release is nullable, so an ``ALTER TABLE ... ADD COLUMN`` upgrades a ledger in place
    (no data is rewritten). Anything else would need a real migration and fails loudly instead.
    """
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise LedgerError(
                    f"the ledger's table {table.name} lacks the column {column.name}, which cannot be added in place"
                )
            type_sql = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {type_sql}')
            log.info("ledger upgraded: added column %s.%s", table.name, column.name)


def sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see sqlite_on_begin), so the driver must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")  # an instance is acknowledged only once recorded
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def sqlite_on_begin(connection: Any) -> None:
    # Take the write lock at the start: a deferred transaction that reads and then writes can fail
    # at once with "database is locked" when another process wrote in between, busy timeout or not.
    # A read-only transaction (Ledger.reading) never writes, so it needs no lock.
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
