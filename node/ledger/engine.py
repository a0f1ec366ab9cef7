"""The ledger's database engine: the URL checked, the SQLite connection settings, the file kept private.

Shared by the ledger's transactions (:mod:`node.ledger.sessions`) and its schema migrations
(:mod:`node.ledger.migrations`), which must open the database the same way (WAL, busy timeout, the
write lock taken up front) without opening a :class:`~node.ledger.Ledger`, which refuses an old schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from node.ledger.schema import LedgerError
from config.private_files import create_private_file, make_private

SQLITE_BUSY_TIMEOUT_MS = 30_000
READ_ONLY = "pleura_read_only"
"""Execution option of the connections of :meth:`Ledger.reading` (a plain BEGIN on SQLite)."""


def display_url(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def open_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine on the ledger database; a LedgerError naming PLEURA_DATABASE_URL when it cannot be made."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise LedgerError(
                f"ledger database {display_url(url)}: folder {folder} does not exist "
                "(check PLEURA_DATABASE_URL or PLEURA_STORAGE_DIR)"
            )
        database = Path(parsed.database).expanduser()
        if not database.exists():
            try:  # 0600 from the start: SQLite would make it with the umask's mode (0644)
                create_private_file(database)
            except OSError as exc:
                raise LedgerError(f"ledger database {display_url(url)} (PLEURA_DATABASE_URL): {exc}") from exc
    try:
        engine = create_engine(url, echo=echo, pool_pre_ping=not is_sqlite)
    except (SQLAlchemyError, ImportError) as exc:
        raise LedgerError(f"ledger database {display_url(url)} (PLEURA_DATABASE_URL): {exc}") from exc
    if is_sqlite:
        event.listen(engine, "connect", sqlite_on_connect)
        event.listen(engine, "begin", sqlite_on_begin)
    return engine


def make_database_private(url: str) -> None:
    """A SQLite ledger holds patient IDs: its owner's only. SQLite gives the -wal and -shm it makes
    later the database file's mode (config/private_files.py)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return
    database = Path(parsed.database).expanduser()
    for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))):
        if path.exists():
            make_private(path)


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
