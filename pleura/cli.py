"""The `pleura` command: run the node and the workers, build the demo model, run the demo, train models."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Optional

from pleura.installation import exit_if_shadowed

exit_if_shadowed()  # before any other project module: another distribution's `config` or `node` fails here

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from pleura.cli_common import DEBUG_KEY, ConfigOption, PleuraGroup, console, settings_or_exit, setup_logging  # noqa: E402
from pleura.cli_evaluate import register_quality_commands  # noqa: E402
from pleura.dataset_cli import dataset_app  # noqa: E402
from pleura.db_cli import db_app  # noqa: E402
from pleura.models_cli import models_app  # noqa: E402
from pleura.ops_cli import register_ops_commands  # noqa: E402
from pleura.train_cli import train  # noqa: E402

app = typer.Typer(
    help="Pleura: a DICOM node that flags suspected pneumothorax.", no_args_is_help=True, cls=PleuraGroup
)


def _show_version(value: bool) -> None:
    """``pleura --version``: the package's version and the model each kind would be analysed with."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        print(f"pleura {version('pleura')}")
    except PackageNotFoundError:  # run from a source tree that is not installed
        print("pleura (not installed)")
    from config.settings import SettingsError, load_settings
    from contract.active import active_bundle_dir
    from contract.bundle import BundleError, load_bundle

    try:
        settings = load_settings()
    except SettingsError:
        print("models: unknown (the configuration is invalid: see `pleura config`)")
        raise typer.Exit()
    for kind in ("radiograph", "ct"):
        try:
            label = load_bundle(active_bundle_dir(settings, kind)).identity.label
        except BundleError:
            label = "none usable (see `pleura models list`)"
        print(f"{kind} model: {label}")
    raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an expected failure too"),
    version: bool = typer.Option(
        False, "--version", "-V", callback=_show_version, is_eager=True,
        help="show the version and the active models, and exit",
    ),
) -> None:
    ctx.meta[DEBUG_KEY] = debug


@app.command()
def node(
    config: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    export_worker: bool = typer.Option(True, help="also run the node-side export worker (C-STORE of results)"),
) -> None:
    """Run the DICOM node: Storage SCP, ledger, study settling, dispatch and export."""
    settings = settings_or_exit(config)
    setup_logging(verbose, log_format=settings.log_format)
    from node.service import run_node

    run_node(settings, export_worker=export_worker, config_file=config)


@app.command()
def worker(
    config: Optional[Path] = ConfigOption,
    queues: Optional[str] = typer.Option(None, help="comma-separated queues (default: PLEURA_WORKER_QUEUES)"),
    concurrency: int = typer.Option(1, help="processes; use one worker per GPU"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run an analysis worker (Celery): loads the model bundle and analyses queued studies."""
    settings = settings_or_exit(config)
    setup_logging(verbose, log_format=settings.log_format)
    from training.ct_demo_model import ensure_ct_demo_bundle
    from worker.startup import WorkerStartError, run_worker

    try:
        run_worker(settings, queues=queues, concurrency=concurrency, verbose=verbose,
                   build_ct_demo=lambda bundle_dir: ensure_ct_demo_bundle(bundle_dir, progress=False)[0])
    except WorkerStartError as exc:
        console.print(f"[bold red]Model bundle error[/] {exc}")
        raise typer.Exit(2) from None


@app.command("demo-model")
def demo_model(
    config: Optional[Path] = ConfigOption,
    out: Optional[Path] = typer.Option(None, help="where to write the bundle (default: the configured model dir)"),
    force: bool = typer.Option(False, help="rebuild even if a bundle is already there"),
    seed: int = typer.Option(0),
    ct: bool = typer.Option(False, "--ct", help="only the CT demo bundle (default: both; --out names the radiograph one)"),
) -> None:
    """Train the small SYNTHETIC DEMO model bundles (not for clinical use) from generated images:
    radiograph (classifier + U-Net) and CT (U-Net on CT phantoms)."""
    settings = settings_or_exit(config)
    from training.ct_demo_model import ensure_ct_demo_bundle
    from training.demo_model import ensure_demo_bundle
    from contract.active import ct_demo_bundle_dir, demo_bundle_dir

    if ct or out is None:
        target = (out if ct else None) or ct_demo_bundle_dir(settings)
        _ensure_demo("CT demo bundle", target, "a minute or two", ensure_ct_demo_bundle, force, seed, progress=False)
        if ct:
            return
    target = out or demo_bundle_dir(settings)
    _ensure_demo("demo bundle", target, "a few minutes", ensure_demo_bundle, force, seed, progress=True)


def _ensure_demo(what: str, target: Path, duration: str, ensure, force: bool, seed: int, *, progress: bool) -> None:
    """Build one synthetic demo bundle at ``target`` unless it is already there and current."""
    from contract.bundle import BundleError

    console.print(f"making sure the synthetic {what} in {target} is current (training it takes {duration})")
    try:
        bundle, built = ensure(target, force=force, seed=seed, progress=progress)
    except BundleError as exc:
        console.print(f"[bold red]{exc}[/]: use --out or --force")
        raise typer.Exit(2) from None
    if not built:
        console.print(f"{what} already present: {target} ({bundle.identity.label})")
        return
    console.print(f"[green]written[/] {bundle.path}: {bundle.identity.label}")
    console.print(json.dumps(bundle.manifest.metrics, indent=2))


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="folder for the demo's storage and received results"),
    timeout: float = typer.Option(300.0, help="seconds to wait for the results"),
) -> None:
    """Start node, worker and a receiving PACS stand-in on loopback, send a chest image, show the result."""
    setup_logging(False, quiet=True)
    from pleura.demo import run_demo

    sys.exit(run_demo(workdir=workdir, timeout=timeout, console=Console()))



@app.command()
def worklist(
    config: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the worklist API and page on their own (`pleura node` serves them too when
    PLEURA_API_USERS is set); notifications stay with `pleura node`."""
    settings = settings_or_exit(config)
    setup_logging(verbose, log_format=settings.log_format)
    if not settings.api_users:
        console.print("[bold red]No API users[/]: set PLEURA_API_USERS (see docs/configuration.md)")
        raise typer.Exit(2)
    from node.api.server import WorklistServer
    from node.ledger import Ledger
    from config.private_files import restrict_umask

    restrict_umask()  # what it and its libraries create is private (config/private_files.py)

    ledger = Ledger(settings.ledger_url)  # an old schema stops here, before anything is served
    server = WorklistServer(settings, ledger, log_level="info" if verbose else "warning")
    console.print(f"worklist on {server.url}/")
    server.serve()


@app.command("api-token")
def api_token() -> None:
    """Make a new random API token and print it with its SHA-256 (for `token_sha256` in PLEURA_API_USERS)."""
    import hashlib
    import secrets

    token = secrets.token_urlsafe(32)
    print(json.dumps({"token": token, "token_sha256": hashlib.sha256(token.encode()).hexdigest()}, indent=2))


class ExportFormat(str, Enum):
    json = "json"
    csv = "csv"


@app.command("feedback-export")
def feedback_export(
    config: Optional[Path] = ConfigOption,
    out: Path = typer.Option(..., help="file to write"),
    format: ExportFormat = typer.Option(ExportFormat.json, help="json (one object per study) or csv (one row per image)"),
) -> None:
    """Write the radiologists' feedback in force per study, with image and SEG keys, for retraining."""
    settings = settings_or_exit(config)
    from node.api.routers.feedback import export_csv
    from node.ledger import Ledger

    exported = Ledger(settings.ledger_url).feedback_export()
    if format is ExportFormat.csv:
        out.write_text(export_csv(exported))
    else:
        out.write_text(json.dumps(exported, indent=2, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)))
    console.print(f"{len(exported)} stud{'y' if len(exported) == 1 else 'ies'} with feedback written to {out}")


@app.command("reanalyse")
def reanalyse_command(
    study: Optional[str] = typer.Argument(None, help="the study's reference (the worklist's `ref`)"),
    since: Optional[datetime] = typer.Option(None, help="every study received since this date/time (UTC)"),
    model: Optional[str] = typer.Option(None, help="every study last analysed by this model version (VERSION or NAME/VERSION)"),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Analyse studies again with the active model: new results (a new series when the model
    changed) delivered to every destination; the worklist keeps the earlier analyses."""
    from node.ledger import Ledger
    from node.reanalyse import ReanalysisError, reanalyse

    settings = settings_or_exit(config)
    try:
        done = reanalyse(Ledger(settings.ledger_url), study_ref=study, received_since=since, model_version=model)
    except ReanalysisError as exc:
        typer.echo(f"Re-analysis refused: {exc}", err=True)
        raise typer.Exit(2) from None
    for ref in done.refs:
        typer.echo(ref)
    typer.echo(f"{len(done.refs)} stud(ies) will be analysed again by the running node")


@app.command("config")
def show_config(config: Optional[Path] = ConfigOption) -> None:
    """Check the configuration and print each setting in effect (secrets masked) and where it came from
    (default, TOML file, environment), as JSON."""
    from config.describe import describe_settings

    settings = settings_or_exit(config)
    print(json.dumps(describe_settings(settings, config), indent=2))


app.add_typer(dataset_app, name="dataset")
app.command()(train)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
register_quality_commands(app)  # `pleura evaluate`, `tune`, `compare`
register_ops_commands(app, settings_or_exit, setup_logging, ConfigOption, console)

if __name__ == "__main__":
    app()
