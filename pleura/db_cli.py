"""`pleura db …`: the ledger's schema revisions (current, upgrade, downgrade).

The behaviour is ``node/ledger/migrations.py``; these commands name the ledger (PLEURA_DATABASE_URL,
without its password), print where its schema stands, and report a refusal in one line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from node.ledger.migrations import downgrade, schema_state, upgrade
from pleura.cli_common import ConfigOption, console, settings_or_exit

db_app = typer.Typer(
    help="The ledger's schema: where it stands, upgrade it after installing a new release, roll it back.",
    no_args_is_help=True,
)


@db_app.command("current")
def current(config: Optional[Path] = ConfigOption) -> None:
    """Print the ledger's schema revision and whether it is this release's (exit 1 when it is not)."""
    settings = settings_or_exit(config)
    state = schema_state(settings.ledger_url)
    print(state.describe())
    if not state.up_to_date:
        raise typer.Exit(1)


@db_app.command("upgrade")
def upgrade_command(
    config: Optional[Path] = ConfigOption,
    revision: str = typer.Argument("head", help="the revision to reach (default: this release's newest)"),
) -> None:
    """Upgrade the ledger's schema (back the ledger up first: docs/deployment.md). Stop every node,
    export worker and worklist on this ledger before; an up-to-date ledger is left as it is."""
    settings = settings_or_exit(config)
    before, after = upgrade(settings.ledger_url, revision)
    was = "empty" if before.empty else "before migrations" if before.pre_migration else before.current
    if before.current == after.current:
        print(f"{after.url}: already at {after.current}, nothing to do")
    else:
        print(f"{after.url}: upgraded from {was} to {after.current}")


@db_app.command("downgrade")
def downgrade_command(
    revision: str = typer.Argument(..., help="the revision to go back to (e.g. 0001_baseline)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Undo the revisions after REVISION (to run an older release again). Data in what they added
    (a new table's rows) is lost: restoring the backup taken before the upgrade keeps everything."""
    settings = settings_or_exit(config)
    before, after = downgrade(settings.ledger_url, revision)
    print(f"{after.url}: downgraded from {before.current} to {after.current}")
