"""The ledger's schema versions: Alembic revisions shipped in the package, run without an alembic.ini.

A new, empty database is created at the newest revision (head) and stamped, in one transaction:
under a PostgreSQL advisory lock, so processes that open it together do not collide; SQLite
serialises writers itself. A database at an older revision is never changed by opening it: the
node, the export worker and the worklist refuse to start and name ``pleura db upgrade``, because
the ledger may be shared by several nodes (an older one still running would break on the new
schema) and an upgrade should follow a backup (docs/deployment.md).

A ledger from before migrations (tables, no ``alembic_version``) is adopted by ``pleura db
upgrade``: its tables must be the baseline's; the nullable columns that releases before migrations
added in place (the old ``add_missing_columns``) are added if missing, it is stamped at the
baseline, then upgraded like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from node.ledger.engine import display_url, make_database_private, open_engine
from node.ledger.schema import Base, LedgerError

log = logging.getLogger(__name__)
# Alembic says "Context impl SQLiteImpl." at INFO on every ledger open: the node logs what changed.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

REVISIONS_DIR = Path(__file__).with_name("revisions")
BASELINE = "0001_baseline"
"""The schema of the last release without migrations: what a pre-migration ledger is stamped as."""
SCHEMA_LOCK_KEY = 0x504C4555  # "PLEU": the advisory lock that serialises schema changes on PostgreSQL
UPGRADE_COMMAND = "pleura db upgrade"


@dataclass(frozen=True)
class SchemaState:
    """Where a ledger's schema stands against this Pleura's revisions."""

    url: str
    current: str | None  # the stamped revision; None when unversioned
    head: str
    pre_migration: bool  # tables without a revision (a ledger from before migrations)
    empty: bool  # no tables at all

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    @property
    def known(self) -> bool:
        """Whether this Pleura knows the stamped revision (a newer one may have upgraded it)."""
        return self.current is None or self.current in known_revisions()

    def describe(self) -> str:
        if self.empty:
            return f"{self.url}: empty; `{UPGRADE_COMMAND}` or starting the node creates it at {self.head}"
        if self.pre_migration:
            return f"{self.url}: from before migrations (no revision); run `{UPGRADE_COMMAND}` (head is {self.head})"
        if self.up_to_date:
            return f"{self.url}: at {self.current} (head), up to date"
        if not self.known:
            return f"{self.url}: at {self.current}, which this Pleura does not know (a newer release upgraded it); head here is {self.head}"
        return f"{self.url}: at {self.current}, behind head {self.head}; run `{UPGRADE_COMMAND}`"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, made in code: the revisions in the package, the given connection."""
    config = Config()
    config.set_main_option("script_location", str(REVISIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def known_revisions() -> set[str]:
    return {script.revision for script in _script().walk_revisions()}


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


@contextmanager
def _schema_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that changes the schema alone: under the advisory lock on PostgreSQL; on
    SQLite the connection's BEGIN IMMEDIATE already takes the write lock."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        yield connection


def _state(connection: Connection, url: str) -> SchemaState:
    tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
    current = MigrationContext.configure(connection).get_current_revision()
    return SchemaState(
        url=display_url(url),
        current=current,
        head=head_revision(),
        pre_migration=current is None and bool(tables & set(Base.metadata.tables)),
        empty=current is None and not tables & set(Base.metadata.tables),
    )


def ensure_schema(engine: Engine) -> None:
    """Create a new ledger at head, or check that an existing one is at head.

    Called every time the ledger is opened. A ledger at another revision raises a LedgerError that
    names the command to run: nothing here ever alters an existing schema.
    """
    url = engine.url.render_as_string(hide_password=False)
    with _schema_transaction(engine) as connection:
        state = _state(connection, url)
        if state.empty:
            Base.metadata.create_all(connection)
            MigrationContext.configure(connection).stamp(_script(), "head")
            log.info("ledger created at schema revision %s", state.head)
            return
    if state.up_to_date:
        return
    if not state.known:
        raise LedgerError(
            f"the ledger {state.url} is at schema revision {state.current}, newer than this Pleura knows "
            f"(head {state.head}): run the release that upgraded it, or downgrade it with `pleura db downgrade` "
            "from that release"
        )
    found = "from before migrations" if state.pre_migration else f"at schema revision {state.current}"
    raise LedgerError(
        f"the ledger {state.url} is {found}, this Pleura needs {state.head}: back it up, then run "
        f"`{UPGRADE_COMMAND}` (docs/deployment.md)"
    )


def schema_state(url: str) -> SchemaState:
    """Where the ledger at `url` stands (`pleura db current`); changes nothing."""
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            return _state(connection, url)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the ledger {display_url(url)} (PLEURA_DATABASE_URL): {exc}") from exc
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> tuple[SchemaState, SchemaState]:
    """Bring the ledger at `url` to `revision` (`pleura db upgrade`); returns the state before and after.

    An empty database is created by the revisions; one from before migrations is adopted first
    (:func:`adopt_pre_migration`). Everything runs in one transaction under the schema lock, so a
    failed revision leaves the ledger as it was (PostgreSQL and SQLite both have transactional DDL).
    """
    return _migrate(url, lambda config: command.upgrade(config, revision))


def downgrade(url: str, revision: str) -> tuple[SchemaState, SchemaState]:
    """Take the ledger at `url` back to `revision` (`pleura db downgrade`), undoing later revisions."""
    return _migrate(url, lambda config: command.downgrade(config, revision))


def _migrate(url: str, run: Callable[[Config], None]) -> tuple[SchemaState, SchemaState]:
    engine = open_engine(url)
    try:
        with _schema_transaction(engine) as connection:
            before = _state(connection, url)
            if before.pre_migration:
                adopt_pre_migration(connection)
            run(alembic_config(connection))
            after = _state(connection, url)
        make_database_private(url)
        if before.current != after.current:
            log.info("ledger schema moved from %s to %s", before.current or "no revision", after.current)
        return before, after
    except SQLAlchemyError as exc:
        raise LedgerError(f"schema migration of the ledger {display_url(url)} failed, nothing changed: {exc}") from exc
    except Exception as exc:  # Alembic's own errors (an unknown revision, say)
        if isinstance(exc, LedgerError) or type(exc).__module__.split(".")[0] != "alembic":
            raise
        raise LedgerError(f"schema migration of the ledger {display_url(url)}: {exc}") from exc
    finally:
        engine.dispose()


def baseline_columns() -> dict[str, set[str]]:
    """The baseline revision's tables and columns, read from a scratch in-memory database built by it."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as connection:
            command.upgrade(alembic_config(connection), BASELINE)
            inspector = inspect(connection)
            return {
                table: {column["name"] for column in inspector.get_columns(table)}
                for table in inspector.get_table_names()
                if table != "alembic_version"
            }
    finally:
        scratch.dispose()


def adopt_pre_migration(connection: Connection) -> None:
    """Stamp a ledger from before migrations as the baseline, after checking that it is one.

    Releases before migrations created every table at each start and added the nullable columns
    defined since (``ALTER TABLE ... ADD COLUMN``); a ledger last opened by an older one may lack
    some of those columns, so they are added here, as those releases did, and only here: from the
    baseline on, every change is a revision. A missing table, or a missing column that cannot be
    added in place, means it is not a Pleura ledger of that age: nothing is changed.
    """
    inspector = inspect(connection)
    present_tables = set(inspector.get_table_names())
    expected = baseline_columns()
    missing = sorted(set(expected) - present_tables)
    if missing:
        raise LedgerError(
            f"the ledger has no revision and lacks the table(s) {', '.join(missing)}: it is not a Pleura ledger "
            "from before migrations; open it once with the last release before migrations, or restore a backup"
        )
    add_missing_columns(connection, expected)
    MigrationContext.configure(connection).stamp(_script(), BASELINE)
    log.info("ledger from before migrations stamped at %s", BASELINE)


def add_missing_columns(connection: Connection, expected: dict[str, set[str]]) -> None:
    """Add the nullable `expected` columns a pre-migration ledger lacks (types from the models)."""
    inspector = inspect(connection)
    for table_name, columns in expected.items():
        table = Base.metadata.tables[table_name]
        present = {column["name"] for column in inspector.get_columns(table_name)}
        for name in sorted(columns - present):
            column = table.columns[name]
            if not column.nullable:
                raise LedgerError(
                    f"the ledger's table {table_name} lacks the column {name}, which cannot be added in place: "
                    "restore a backup or open it once with the last release before migrations"
                )
            type_sql = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f'ALTER TABLE {table_name} ADD COLUMN "{name}" {type_sql}')
            log.info("pre-migration ledger: added column %s.%s", table_name, name)


def schema_differences(url: str) -> list[object]:
    """What Alembic's autogenerate comparison finds between the models and the ledger at `url`
    (empty when they agree): the check that the revisions and the models describe one schema."""
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


__all__ = [
    "BASELINE",
    "SchemaState",
    "UPGRADE_COMMAND",
    "adopt_pre_migration",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "schema_differences",
    "schema_state",
    "upgrade",
]
