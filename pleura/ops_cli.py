"""Commands for running Pleura as separate services (containers): `pleura export-worker`,
`pleura healthcheck` and `pleura check` (the site's dependencies and peers, from a shell). (The
analysis worker's health endpoint and log format: worker/startup.py.)"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from config.private_files import restrict_umask
from config.settings import Settings
from node.logs import keep_celery_from_logging_setup
from node.storage import InstanceStore
from node.text import log_text

log = logging.getLogger(__name__)


def _local_url(host: str, port: int, path: str) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}{path}"


def register_ops_commands(
    app: typer.Typer,
    load: Callable[..., Settings],
    setup_logging: Callable[..., None],
    config_option: Any,
    console: Any,
) -> None:
    """Add the commands to `app`; `load`, `setup_logging`, `config_option` and `console` are the
    CLI's own helpers (passed in, so this module does not import the CLI module)."""

    @app.command("export-worker")
    def export_worker(
        config: Optional[Path] = config_option,
        concurrency: Optional[int] = typer.Option(None, help="threads; default: the export_threads setting"),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
    ) -> None:
        """Run the node-side export worker on its own, beside `pleura node --no-export-worker` (a
        container of its own): records the workers' summaries and delivers the results."""
        settings = load(config)
        setup_logging(verbose, log_format=settings.log_format)
        restrict_umask()  # what it and its libraries create is private (config/private_files.py)
        from node.ops.server import export_worker_ops_server
        from node.progress import register_progress_tasks
        from node.service import export_worker_args
        from node.tasks import node_context, register_node_tasks
        from contract.celery_app import make_celery

        celery_app = make_celery(settings)
        register_node_tasks(celery_app)
        register_progress_tasks(celery_app)
        keep_celery_from_logging_setup(logging.DEBUG if verbose else logging.INFO, settings.log_format)
        export_worker_ops_server(settings, node_context(celery_app).ledger, celery_app).start()
        if concurrency is not None:
            settings = settings.model_copy(update={"export_threads": concurrency})
        args = export_worker_args(settings)
        if settings.log_format == "json":
            args.insert(0, "--quiet")  # no start-up banner: it is plain text
        celery_app.worker_main(args)

    @app.command()
    def check(
        config: Optional[Path] = config_option,
        json_output: bool = typer.Option(False, "--json", help="print the results as JSON"),
        timeout: float = typer.Option(10.0, help="seconds each peer has to answer"),
    ) -> None:
        """Check this site's configuration end to end: database, broker, storage (writable, free space),
        the active model, a C-ECHO to each destination, a connection to each HL7 listener, a request
        to each webhook. One line per check; exit 1 when any fails."""
        settings = load(config)
        setup_logging(False, quiet=True)
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a failed association is a result line
        from node.ops.check import run_site_checks
        from contract.celery_app import make_celery

        results = run_site_checks(settings, make_celery(settings), timeout=timeout)
        failed = [result for result in results if not result.ok]
        if json_output:
            print(json.dumps({"ok": not failed, "checks": [result.as_dict() for result in results]}, indent=2))
        else:
            width = max(len(result.name) for result in results)
            for result in results:
                print(f"{'ok  ' if result.ok else 'FAIL'}  {result.name:<{width}}  {result.detail}")
        if failed:
            console.print(f"[bold red]{len(failed)} of {len(results)} checks failed[/]", highlight=False)
            raise typer.Exit(1)

    @app.command()
    def quarantine(
        config: Optional[Path] = config_option,
        json_output: bool = typer.Option(False, "--json", help="print the entries as JSON"),
        limit: int = typer.Option(50, min=1, help="show at most this many, newest first"),
    ) -> None:
        """List what reception refused and kept in `<storage_dir>/quarantine/`, newest first: when,
        how large, and why (an identity conflict, a malformed data set, a refused SOP class...).
        The files stay there for inspection until the quarantine's size cap removes the oldest."""
        settings = load(config)
        entries = InstanceStore(settings.storage_dir).quarantined()
        shown = entries[:limit]
        if json_output:
            print(json.dumps({"total": len(entries), "entries": [entry.as_dict() for entry in shown]}, indent=2))
            return
        if not entries:
            print(f"nothing in quarantine ({settings.storage_dir / 'quarantine'})")
            return
        for entry in shown:
            kept = entry.kept_at.strftime("%Y-%m-%d %H:%M:%S UTC")
            print(f"{kept}  {entry.size_bytes:>10} B  {entry.name}  {log_text(entry.reason)}")
        if len(entries) > len(shown):
            console.print(f"{len(entries) - len(shown)} older entries not shown (--limit)", highlight=False)

    @app.command()
    def healthcheck(
        config: Optional[Path] = config_option,
        url: Optional[str] = typer.Option(None, help="URL to ask (default: /healthz of this host's Pleura process)"),
        ready: bool = typer.Option(False, "--ready", help="ask /readyz instead: every dependency must answer"),
        timeout: float = typer.Option(5.0, help="seconds"),
    ) -> None:
        """Exit 0 when the Pleura process on this host answers /healthz (or /readyz): for Docker's
        HEALTHCHECK and other probes. Tries PLEURA_WORKER_METRICS_PORT, then PLEURA_METRICS_PORT."""
        settings = load(config)
        path = "/readyz" if ready else "/healthz"
        ports = [port for port in (settings.worker_metrics_port, settings.metrics_port) if port]
        urls = [url] if url else [_local_url(settings.metrics_host, port, path) for port in dict.fromkeys(ports)]
        problems = []
        for candidate in urls:
            try:
                with urllib.request.urlopen(candidate, timeout=timeout) as response:
                    if response.status == 200:
                        print(f"{candidate}: ok")
                        return
                    problems.append(f"{candidate}: HTTP {response.status}")
            except urllib.error.HTTPError as exc:
                problems.append(f"{candidate}: HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}")
            except OSError as exc:
                problems.append(f"{candidate}: {exc}")
        console.print("[bold red]not healthy[/]: " + "; ".join(problems))
        raise typer.Exit(1)
