"""The ledger's schema revisions (node/ledger/migrations.py): a ledger made by the baseline with
real rows upgraded to head with its data intact, on SQLite and PostgreSQL; the revisions and the
models agree (Alembic's autogenerate comparison); a ledger from before migrations adopted; an old
schema refused at start, through the real CLI, with the command to run."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, insert, inspect, select, text
from sqlalchemy.orm import Session

from node.ledger import (
    AnalysisStart,
    Base,
    Feedback,
    Instance,
    Ledger,
    LedgerError,
    Notification,
    NotificationState,
    OutboxEntry,
    Result,
    SegLabel,
    Study,
    StudyRef,
)
from node.ledger.migrations import BASELINE, downgrade, head_revision, schema_differences, schema_state, upgrade
from services import REPO, PostgresCluster, free_port, write_config

T0 = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
STUDY = "1.2.826.0.1.3680043.8.498.70"


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    return request.getfixturevalue("postgres").new_database_url()


def fill_baseline(url: str) -> None:
    """Rows in every table of the baseline, as a running node leaves them: a flagged study with
    two images, its results, their outbox, feedback, a notification and its state, a SEG label.
    Written through the tables as the database has them (reflected), not through today's models,
    which later revisions extend."""
    engine = create_engine(url)
    tables = MetaData()
    tables.reflect(engine)

    def add(connection, name: str, **row) -> object:
        return connection.execute(insert(tables.tables[name]).values(**row)).inserted_primary_key[0]

    with engine.begin() as connection:
        add(connection, "studies", study_uid=STUDY, patient_id="PID-7", accession_number="ACC-7", status="delivered",
            first_received_at=T0, last_received_at=T0, queued_at=T0, task_id="task-1",
            analysed_at=T0 + timedelta(minutes=1), delivered_at=T0 + timedelta(minutes=2), flagged=True,
            probability=0.91, model_name="pleura-cxr", model_version="1.0.0", synthetic_model=True, reason=None)
        for n, flagged in ((1, True), (2, False)):
            add(connection, "instances", sop_instance_uid=f"{STUDY}.{n}", study_uid=STUDY,
                series_instance_uid=f"{STUDY}.0", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"instances/{n}.dcm", received_at=T0,
                calling_ae="MODALITY", analysis_status="analysed", probability=0.91 if flagged else 0.05,
                flagged=flagged, area_px=1200 if flagged else 0, area_cm2=3.5 if flagged else 0.0,
                side="left" if flagged else None, gap_mm=12.5 if flagged else None,
                hemithorax_fraction=0.2 if flagged else None)
        result_id = add(connection, "results", sop_instance_uid=f"{STUDY}.900", kind="sr",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", storage_key="results/sr.dcm", study_uid=STUDY,
                        source_sop_instance_uid=f"{STUDY}.1", created_at=T0)
        add(connection, "outbox", result_id=result_id, destination="PACS@127.0.0.1:104", status="sent", attempts=2,
            last_attempt_at=T0, last_error=None, created_at=T0, sent_at=T0)
        add(connection, "study_refs", ref="r" * 32, study_uid=STUDY)
        add(connection, "feedback", study_uid=STUDY, verdict="confirmed", user="dr-a", comment="apical", created_at=T0,
            flagged=True, probability=0.91, model_name="pleura-cxr", model_version="1.0.0")
        add(connection, "seg_labels", seg_sop_instance_uid=f"{STUDY}.800", seg_study_uid=STUDY,
            sop_instance_uid=f"{STUDY}.1", storage_key="labels/seg.dcm", positive=True, calling_ae="PACS",
            received_at=T0)
        add(connection, "notifications", study_uid=STUDY, event="flagged", channel="hl7", target="RIS@127.0.0.1:2575",
            payload="MSH|^~\\&|PLEURA", status="sent", attempts=1, max_attempts=10, created_at=T0, sent_at=T0,
            response="MSA|AA|1")
        add(connection, "notification_state", study_uid=STUDY, flagged=True, analysed_at=T0, feedback_id=1,
            checked_at=T0)
        add(connection, "analysis_starts", study_uid=STUDY, task_id="task-1", started_at=T0)
    engine.dispose()


def dump(url: str, tables: list[str], columns: dict[str, list[str]] | None = None) -> dict[str, list[tuple]]:
    """The rows of ``tables`` (only ``columns[name]`` of each when given: a later revision may add
    columns), in primary-key order."""
    engine = create_engine(url)
    found = MetaData()
    found.reflect(engine, only=tables)
    with engine.connect() as connection:
        out = {}
        for name in tables:
            table = found.tables[name]
            chosen = [table.c[c] for c in columns[name]] if columns else list(table.c)
            out[name] = [tuple(row) for row in connection.execute(select(*chosen).order_by(*table.primary_key.columns))]
    engine.dispose()
    return out


def columns_of(url: str, tables: list[str]) -> dict[str, list[str]]:
    inspector = inspect(create_engine(url))
    return {name: [c["name"] for c in inspector.get_columns(name)] for name in tables}


def test_a_baseline_ledger_with_rows_is_upgraded_to_head_with_its_data_intact(url: str) -> None:
    upgrade(url, BASELINE)
    assert schema_state(url).current == BASELINE
    fill_baseline(url)
    baseline_tables = sorted(set(inspect(create_engine(url)).get_table_names()) - {"alembic_version"})
    assert "login_sessions" not in baseline_tables and "outbox" in baseline_tables
    baseline_columns = columns_of(url, baseline_tables)
    before = dump(url, baseline_tables, baseline_columns)
    assert all(before[name] for name in baseline_tables), "every table holds a row"

    with pytest.raises(LedgerError, match="pleura db upgrade"):
        Ledger(url)

    was, now = upgrade(url)
    assert (was.current, now.current) == (BASELINE, head_revision())
    assert dump(url, baseline_tables, baseline_columns) == before  # later revisions may only add

    ledger = Ledger(url)  # opens, and the data reads back through the ledger's own calls
    status = ledger.study_status(STUDY)
    assert status is not None and status["status"] == "delivered" and status["flagged"] is True
    assert [entry.status for entry in ledger.list_outbox(STUDY)] == ["sent"]
    assert [n.response for n in ledger.list_notifications(STUDY)] == ["MSA|AA|1"]
    assert {i.side for i in ledger.list_instances(STUDY)} == {"left", None}
    ledger.close()


def test_a_downgrade_to_the_baseline_keeps_the_data_and_upgrades_again(url: str) -> None:
    upgrade(url, BASELINE)
    fill_baseline(url)
    upgrade(url)
    was, now = downgrade(url, BASELINE)
    assert (was.current, now.current) == (head_revision(), BASELINE)
    assert "login_sessions" not in inspect(create_engine(url)).get_table_names()
    assert dump(url, ["studies"])["studies"][0][0] == STUDY
    assert upgrade(url)[1].up_to_date


def test_the_revisions_and_the_models_describe_one_schema(url: str) -> None:
    """Autogenerate finds nothing to change after the revisions ran: a model changed without a
    revision (or a revision that does not match its model) fails here."""
    upgrade(url)
    assert schema_differences(url) == []


def test_a_new_ledger_is_created_at_head_and_matches_the_revisions(url: str) -> None:
    Ledger(url).close()  # created from the models and stamped
    assert schema_state(url).up_to_date
    assert schema_differences(url) == []
    assert upgrade(url)[0].up_to_date  # nothing to do


def _pre_migration_ledger(path: Path, *drop_columns: str) -> str:
    """A ledger as a release before migrations left it: the baseline's tables, no alembic_version,
    perhaps without some nullable columns added in place by later releases."""
    url = f"sqlite:///{path}"
    upgrade(url, BASELINE)
    fill_baseline(url)
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE alembic_version")
        for column in drop_columns:
            connection.execute(f"ALTER TABLE instances DROP COLUMN {column}")
    return url


def test_a_ledger_from_before_migrations_is_adopted_and_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    url = _pre_migration_ledger(path, "side", "hemithorax_fraction")
    assert schema_state(url).pre_migration
    with pytest.raises(LedgerError, match="from before migrations.*pleura db upgrade"):
        Ledger(url)

    was, now = upgrade(url)
    assert was.pre_migration and now.up_to_date
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(instances)")}
    assert {"side", "hemithorax_fraction"} <= columns
    assert schema_differences(url) == []
    ledger = Ledger(url)
    assert len(ledger.list_instances(STUDY)) == 2
    ledger.close()


def test_a_database_with_other_tables_is_not_taken_for_an_old_ledger(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    url = _pre_migration_ledger(path)
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE seg_labels")
    with pytest.raises(LedgerError, match="lacks the table.*seg_labels"):
        upgrade(url)
    assert schema_state(url).current is None  # nothing changed


def _cli(*args: str, config: Path) -> subprocess.CompletedProcess:
    users = json.dumps([{"name": "dr-a", "token": "t" * 32, "role": "read"}])
    return subprocess.run(
        [sys.executable, "-m", "pleura.cli", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "COLUMNS": "200", "PLEURA_API_USERS": users},
    )


def test_an_old_ledger_stops_node_worklist_and_export_worker_at_start_naming_the_command(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    url = f"sqlite:///{storage / 'ledger.sqlite'}"
    upgrade(url, BASELINE)
    fill_baseline(url)
    config = write_config(tmp_path / "pleura.toml", storage_dir=storage, database_url=url, port=free_port(), api_port=free_port(), metrics_port=free_port())

    for command in ("node", "worklist", "export-worker"):
        run = _cli(command, config=config)
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert run.returncode == 2, (command, run.stdout, run.stderr)
        assert len(lines) == 1 and "pleura db upgrade" in lines[0] and BASELINE in lines[0], (command, run.stderr)

    current = _cli("db", "current", config=config)
    assert current.returncode == 1 and "behind head" in current.stdout
    upgraded = _cli("db", "upgrade", config=config)
    assert upgraded.returncode == 0 and f"from {BASELINE} to {head_revision()}" in upgraded.stdout
    assert _cli("db", "current", config=config).returncode == 0
    assert dump(url, ["instances"])["instances"][0][1] == f"{STUDY}.1"


def test_an_unknown_revision_is_one_line_exit_2(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    config = write_config(tmp_path / "pleura.toml", storage_dir=storage)
    run = _cli("db", "downgrade", "no-such-revision", config=config)
    assert run.returncode == 2 and "no-such-revision" in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_a_ledger_upgraded_by_a_newer_release_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    Ledger(url).close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    engine.dispose()
    with pytest.raises(LedgerError, match="0099_from_the_future.*newer than this Pleura knows"):
        Ledger(url)


def test_the_package_data_ships_every_revision_file() -> None:
    """The revisions run from the installed package: pyproject's package-data must name them all."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["node"]
    folder = REPO / "node" / "ledger" / "revisions"
    files = [p.relative_to(REPO / "node").as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(f.endswith("0001_baseline.py") for f in files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)] == []
