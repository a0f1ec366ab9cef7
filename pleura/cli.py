"""The `pleura` command: run the node and the workers, build the demo model, run the demo, train models."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pleura.cli_common import DEBUG_KEY, ConfigOption, PleuraGroup, console, settings_or_exit, setup_logging
from pleura.cli_evaluate import register_quality_commands
from pleura.dataset_cli import dataset_app
from pleura.models_cli import models_app
from pleura.ops_cli import register_ops_commands, start_worker_ops
from pleura.train_cli import train

app = typer.Typer(
    help="Pleura: a DICOM node that flags suspected pneumothorax.", no_args_is_help=True, cls=PleuraGroup
)


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="show the traceback of an expected failure too"),
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
    from contract.active import active_bundle_dir, is_ct_demo_dir
    from contract.bundle import BundleError, load_bundle

    queue_list = queues or ",".join(settings.worker_queues)
    kinds = [kind for kind in ("radiograph", "ct") if kind in queue_list.split(",")]
    for kind in kinds:
        if kind == "ct" and is_ct_demo_dir(settings, active_bundle_dir(settings, "ct")):
            continue  # the CT demo bundle is built on first use when nothing else is active
        try:
            bundle = load_bundle(active_bundle_dir(settings, kind))
        except BundleError as exc:
            console.print(f"[bold red]Model bundle error[/] ({kind}): {exc}")
            raise typer.Exit(2) from None
        # a log line (text or JSON); the worker follows the registry from then on
        logging.getLogger("pleura.worker").info("%s model: %s", kind, bundle.identity.label)
    from worker.celery_app import make_celery
    from training.ct_demo_model import ensure_ct_demo_bundle
    from worker.tasks import register_worker_tasks, warm_models

    celery_app = make_celery(settings)
    register_worker_tasks(celery_app, lambda bundle_dir: ensure_ct_demo_bundle(bundle_dir, progress=False)[0])
    start_worker_ops(settings, celery_app, verbose)  # JSON logs for Celery too; /healthz when configured
    pool = "solo" if concurrency == 1 else "prefork"
    if concurrency == 1 and settings.worker_threads > 1:  # studies at once, sharing forward passes
        pool, concurrency = "threads", settings.worker_threads
    celery_app.pleura_worker_processes = 1 if pool != "prefork" else concurrency  # torch threads per process
    try:  # load and warm the models before the first task (worker/tasks.py)
        warm_models(celery_app, kinds, prefork=pool == "prefork")
    except Exception as exc:
        console.print(f"[bold red]Cannot load the model[/]: {exc}")
        raise typer.Exit(2) from None
    celery_app.worker_main(
        [
            *(["--quiet"] if settings.log_format == "json" else []),  # no banner: it is plain text
            "worker",
            "-Q",
            queue_list,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            f"analyse-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "DEBUG" if verbose else "INFO",
        ]
    )


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
    import uvicorn

    from node.api.app import create_app
    from node.ledger import Ledger

    console.print(f"worklist on http://{settings.api_host}:{settings.api_port}/")
    uvicorn.run(create_app(settings, Ledger(settings.ledger_url)), host=settings.api_host, port=settings.api_port,
                log_level="info" if verbose else "warning", access_log=False)


@app.command("api-token")
def api_token() -> None:
    """Make a new random API token and print it with its SHA-256 (for `token_sha256` in PLEURA_API_USERS)."""
    import hashlib
    import secrets

    token = secrets.token_urlsafe(32)
    print(json.dumps({"token": token, "token_sha256": hashlib.sha256(token.encode()).hexdigest()}, indent=2))


@app.command("feedback-export")
def feedback_export(
    config: Optional[Path] = ConfigOption,
    out: Path = typer.Option(..., help="file to write"),
    format: str = typer.Option("json", help="json (one object per study) or csv (one row per image)"),
) -> None:
    """Write the radiologists' feedback in force per study, with image and SEG keys, for retraining."""
    settings = settings_or_exit(config)
    if format not in ("json", "csv"):
        console.print("[bold red]--format must be json or csv[/]")
        raise typer.Exit(2)
    from node.api.routers.feedback import export_csv
    from node.ledger import Ledger

    exported = Ledger(settings.ledger_url).feedback_export()
    if format == "csv":
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
    """Check the configuration and print the effective settings."""
    settings = settings_or_exit(config)
    Console().print_json(data=_mask_secrets(settings.model_dump(mode="json")))


def _mask_secrets(value):
    """The settings with API tokens and webhook secrets shown as ***."""
    if isinstance(value, dict):
        return {k: "***" if k in ("token", "secret") and v else _mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_secrets(v) for v in value]
    return value


app.add_typer(dataset_app, name="dataset")
app.command()(train)
app.add_typer(models_app, name="models")
register_quality_commands(app)  # `pleura evaluate`, `tune`, `compare`
register_ops_commands(app, settings_or_exit, setup_logging, ConfigOption, console)

if __name__ == "__main__":
    app()
