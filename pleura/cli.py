"""The `pleura` command: run the node and the workers, build the demo model, run the demo."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from config.settings import CONFIG_FILE_ENV, Settings, SettingsError, load_settings

app = typer.Typer(help="Pleura: a DICOM node that flags suspected pneumothorax.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # messages stay whole for logs and grep

ConfigOption = typer.Option(
    None, "--config", "-c", help=f"TOML settings file (same keys as the PLEURA_* variables; also {CONFIG_FILE_ENV})"
)


def _settings(config: Optional[Path], **overrides) -> Settings:
    try:
        settings = load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        console.print(f"[bold red]Configuration error[/]: {exc}")
        raise typer.Exit(2) from None
    return settings


def _logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("pynetdicom", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


@app.command()
def node(
    config: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    export_worker: bool = typer.Option(True, help="also run the node-side export worker (C-STORE of results)"),
) -> None:
    """Run the DICOM node: Storage SCP, ledger, study settling, dispatch and export."""
    settings = _settings(config)
    _logging(verbose)
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
    settings = _settings(config)
    _logging(verbose)
    from training.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(settings.bundle_dir)
    except BundleError as exc:
        console.print(f"[bold red]Model bundle error[/]: {exc}")
        raise typer.Exit(2) from None
    console.print(f"model: [bold]{bundle.identity.label}[/]")
    from worker.celery_app import make_celery
    from worker.tasks import register_worker_tasks

    celery_app = make_celery(settings)
    register_worker_tasks(celery_app)
    queue_list = queues or ",".join(settings.worker_queues)
    pool = "solo" if concurrency == 1 else "prefork"
    celery_app.worker_main(
        [
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
) -> None:
    """Train the small SYNTHETIC DEMO model bundle (not for clinical use) from generated images."""
    settings = _settings(config)
    target = out or settings.bundle_dir
    from training.bundle import BundleError, load_bundle
    from training.demo_model import build_demo_bundle, is_current_demo_bundle

    if not force:
        try:
            bundle = load_bundle(target)
        except BundleError:
            bundle = None
        if bundle is not None and is_current_demo_bundle(bundle):
            console.print(f"demo bundle already present: {target} ({bundle.identity.label})")
            return
        if bundle is not None and not bundle.manifest.synthetic_demo:
            console.print(f"[bold red]{target} holds a trained model, not the demo[/]: use --out or --force")
            raise typer.Exit(2)

    console.print(f"training the synthetic demo bundle into {target} (a few minutes on a CPU)")
    bundle = build_demo_bundle(target, seed=seed, progress=True)
    console.print(f"[green]written[/] {bundle.path}: {bundle.identity.label}")
    console.print(json.dumps(bundle.manifest.metrics, indent=2))


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="folder for the demo's storage and received results"),
    timeout: float = typer.Option(300.0, help="seconds to wait for the results"),
) -> None:
    """Start node, worker and a receiving PACS stand-in on loopback, send a chest image, show the result."""
    _logging(False, quiet=True)
    from pleura.demo import run_demo

    sys.exit(run_demo(workdir=workdir, timeout=timeout, console=Console()))


@app.command()
def worklist(
    config: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the worklist API and page on their own (`pleura node` serves them too when
    PLEURA_API_USERS is set); notifications stay with `pleura node`."""
    settings = _settings(config)
    _logging(verbose)
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
    settings = _settings(config)
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


@app.command("config")
def show_config(config: Optional[Path] = ConfigOption) -> None:
    """Check the configuration and print the effective settings."""
    settings = _settings(config)
    Console().print_json(data=_mask_secrets(settings.model_dump(mode="json")))


def _mask_secrets(value):
    """The settings with API tokens and webhook secrets shown as ***."""
    if isinstance(value, dict):
        return {k: "***" if k in ("token", "secret") and v else _mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_secrets(v) for v in value]
    return value


if __name__ == "__main__":
    app()
