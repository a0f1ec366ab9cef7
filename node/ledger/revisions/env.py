"""Alembic's environment for the ledger: run on the connection node/ledger/migrations.py hands over
(no alembic.ini, no URL here), against the models of node/ledger/schema.py."""

from __future__ import annotations

from alembic import context

from node.ledger.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the ledger's migrations through `pleura db upgrade` (node/ledger/migrations.py)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    compare_type=True,
    # SQLite alters a table by copying it (batch mode); PostgreSQL alters in place.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
