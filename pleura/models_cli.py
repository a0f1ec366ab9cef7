"""`pleura models …`: the model registry (list, show, import, export, promote, rollback).

The registry itself is ``training/registry.py`` (its read side, ``contract/active.py``); these
commands print what it holds and report its refusals (a bundle that fails a check, a version that
does not exist) with the reason, exit code 2.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pleura.cli_common import ConfigOption, JsonOption, console, print_json, settings_or_exit

models_app = typer.Typer(
    help="The model registry: import bundles as versions, promote one per kind, roll back.", no_args_is_help=True
)

class Kind(str, Enum):
    """The kinds of model the registry keeps one active version of (contract/active.py KINDS)."""

    radiograph = "radiograph"
    ct = "ct"


KindOption = typer.Option(None, "--kind", "-k", help="the kind to promote it for (default: the version's own kind)")
ReasonOption = typer.Option(None, "--reason", help="why, for the registry's history")


def _refused(what: str, exc: Exception) -> typer.Exit:
    console.print(f"[bold red]{what}[/]: {exc}")
    return typer.Exit(2)


def _open(config: Optional[Path]):
    """(settings, the registry they name), or exit 2 saying why there is none."""
    from contract.active import RegistryError
    from training.registry import open_registry

    settings = settings_or_exit(config)
    try:
        return settings, open_registry(settings)
    except RegistryError as exc:
        raise _refused("No registry", exc) from None


def _day(stamp: str | None) -> str:
    return (stamp or "")[:16].replace("T", " ")


def _data(synthetic: bool, training_data: str, limit: int = 40) -> str:
    text = ("SYNTHETIC: " if synthetic else "") + training_data
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _metrics_text(metrics: dict[str, float], limit: int = 3) -> str:
    headline = sorted(metrics, key=lambda key: not any(word in key for word in ("auc", "dice", "f1")))
    shown = [f"{key} {metrics[key]:.3g}" for key in headline[:limit]]
    return ", ".join(shown) + (" …" if len(metrics) > limit else "")


@models_app.command("list")
def list_models(config: Optional[Path] = ConfigOption, json_output: bool = JsonOption) -> None:
    """The registered versions, which one is active per kind, and what each worker has loaded."""
    from contract.bundle import BundleError, load_bundle
    from contract.active import KINDS, RegistryError, fixed_bundle_dir, model_location_setting

    settings = settings_or_exit(config)
    fixed = fixed_bundle_dir(settings)
    out = Console(soft_wrap=True)
    if json_output:
        return print_json(_registry_json(config, fixed))
    if fixed is not None:
        try:
            label = load_bundle(fixed).identity.label
        except BundleError as exc:
            label = f"[red]unusable[/]: {exc}"
        setting = model_location_setting(settings)
        out.print(f"{setting}={fixed} is a single bundle: {label}")
        out.print(f"(no registry: unset {setting} or set PLEURA_MODEL_REGISTRY_DIR instead to use promote/rollback)")
        return
    _, registry = _open(config)
    try:
        state = registry.read()
    except RegistryError as exc:
        raise _refused("Registry error", exc) from None
    table = Table(title=f"model registry {registry.root}")
    for column in ("version", "kind", "active", "created", "data", "metrics", "imported"):
        table.add_column(column, overflow="fold", no_wrap=column == "version")
    active_ids = set(state.active.values())
    if "radiograph" not in state.active:
        try:
            demo = load_bundle(registry.demo_dir).manifest
            table.add_row(f"{demo.name}/{demo.version}", demo.kind, "[green]active[/] (demo bundle)",
                          _day(demo.created), _data(demo.synthetic_demo, demo.training_data),
                          _metrics_text(demo.metrics), "built by pleura demo-model")
        except BundleError:
            table.add_row("(demo bundle)", "radiograph", "[red]not built[/]", "", "", "", "run pleura demo-model")
    for record in state.versions.values():
        p = record.provenance
        table.add_row(
            record.id, record.kind, "[green]active[/]" if record.id in active_ids else "", _day(p.created),
            _data(p.synthetic_demo, p.training_data), _metrics_text(record.metrics),
            f"{_day(p.imported_at)} {p.imported_by}",
        )
    out.print(table)
    missing = [kind for kind in KINDS if kind not in state.active and kind != "radiograph"]
    for kind in missing:
        out.print(f"no active {kind} model")
    workers = registry.workers()
    if workers:
        running = Table(title="workers (last report)")
        for column in ("worker", "kind", "state", "loaded", "since", "last error"):
            running.add_column(column, overflow="fold")
        for item in workers[:20]:
            error = item.get("error")
            state = str(item.get("state", "?")) + (f" (warming {item['warming']})" if item.get("warming") else "")
            running.add_row(item.get("worker", "?"), item.get("kind", "?"), state, str(item.get("loaded")),
                            item.get("updated", ""), f"[red]{error}[/]" if error else "")
        out.print(running)


def _registry_json(config: Optional[Path], fixed: Optional[Path]) -> dict:
    """`pleura models list --json`: the single bundle, or the registry's versions, active ones and workers."""
    from contract.active import RegistryError, active_bundle_dir
    from contract.bundle import BundleError, load_bundle

    def bundle_entry(path: Path) -> dict:
        try:
            bundle = load_bundle(path)
        except BundleError as exc:
            return {"path": str(path), "usable": False, "error": str(exc)}
        manifest = bundle.manifest
        return {"path": str(path), "usable": True, "name": manifest.name, "version": manifest.version,
                "kind": manifest.kind, "synthetic_demo": manifest.synthetic_demo, "metrics": manifest.metrics}

    if fixed is not None:
        return {"single_bundle": bundle_entry(fixed)}
    settings, registry = _open(config)
    try:
        state = registry.read()
    except RegistryError as exc:
        raise _refused("Registry error", exc) from None
    return {
        "registry": str(registry.root),
        "active": {kind: bundle_entry(active_bundle_dir(settings, kind)) | {"version_id": state.active.get(kind)}
                   for kind in Kind.__members__},
        "versions": [record.model_dump(mode="json") | {"active": record.id in set(state.active.values())}
                     for record in state.versions.values()],
        "workers": registry.workers(),
    }


@models_app.command("show")
def show(version: str = typer.Argument(..., help="NAME/VERSION, or VERSION when unique"),
         config: Optional[Path] = ConfigOption) -> None:
    """A version's manifest, metrics, provenance, checksum status and activation history."""
    from contract.bundle import BundleError, load_bundle
    from contract.active import RegistryError

    _, registry = _open(config)
    try:
        record = registry.find(version)
        state = registry.read()
    except RegistryError as exc:
        raise _refused("Unknown version", exc) from None
    out = Console(soft_wrap=True)
    folder = registry.version_dir(record)
    active_as = [kind for kind, ref in state.active.items() if ref == record.id]
    out.print(f"[bold]{record.id}[/] ({record.kind}) in {folder}" + (f" — [green]active[/] for {', '.join(active_as)}" if active_as else ""))
    try:
        out.print_json(data=json.loads(load_bundle(folder).manifest.model_dump_json()))
    except BundleError as exc:
        out.print(f"[red]manifest unreadable[/]: {exc}")
    out.print("[bold]metrics[/]")
    out.print_json(data=record.metrics)
    out.print("[bold]provenance[/]")
    out.print_json(data=record.provenance.model_dump(mode="json"))
    problems = registry.verify(record)
    checks = Table(title="files (SHA-256 recorded at import)")
    for column in ("file", "sha256", "status"):
        checks.add_column(column, overflow="fold")
    for relative, digest in sorted(record.files.items()):
        bad = [p for p in problems if str(folder / relative) in p]
        checks.add_row(relative, digest[:16] + "…", f"[red]{bad[0]}[/]" if bad else "[green]intact[/]")
    out.print(checks)
    events = [e for e in state.history if record.id in (e.from_version, e.to_version)]
    if events:
        history = Table(title="activations")
        for column in ("at", "kind", "action", "from", "to", "by", "reason"):
            history.add_column(column, overflow="fold")
        for e in events:
            history.add_row(e.at, e.kind, e.action, e.from_version or "(demo)", e.to_version or "(demo)", e.by, e.reason or "")
        out.print(history)
    if problems:
        raise typer.Exit(1)


def import_into_registry(settings, source: Path):
    """Import a bundle into the configured registry and print what happened; exit 2 on refusal."""
    from contract.bundle import BundleError
    from contract.active import RegistryError
    from training.registry import open_registry

    try:
        record, added = open_registry(settings).import_bundle(source)
    except RegistryError as exc:
        raise _refused("Registry error", exc) from None
    except BundleError as exc:
        raise _refused("Bundle refused", exc) from None
    if added:  # the registry recorded it in the audit trail
        console.print(f"[green]imported[/] {record.id} ({record.kind}); make it active: pleura models promote {record.id}")
    else:
        console.print(f"{record.id} is already registered with the same files")
    return record


@models_app.command("import")
def import_(path: Path = typer.Argument(..., help="a bundle directory or a .tar.gz made by `pleura models export`"),
            config: Optional[Path] = ConfigOption) -> None:
    """Check a bundle and copy it into the registry as a new, immutable version."""
    import_into_registry(settings_or_exit(config), path)


@models_app.command("export")
def export(version: str = typer.Argument(..., help="NAME/VERSION, or VERSION when unique"),
           out: Path = typer.Argument(..., help="a .tar.gz file, or a new directory"),
           config: Optional[Path] = ConfigOption) -> None:
    """Write a version (files + checksums, metrics, provenance) for `pleura models import` elsewhere."""
    from contract.bundle import BundleError

    _, registry = _open(config)
    try:
        written = registry.export(version, out)
    except BundleError as exc:
        raise _refused("Export refused", exc) from None
    console.print(f"[green]exported[/] {version} to {written}")


@models_app.command("promote")
def promote(version: str = typer.Argument(..., help="NAME/VERSION, or VERSION when unique"),
            kind: Optional[Kind] = KindOption, reason: Optional[str] = ReasonOption,
            config: Optional[Path] = ConfigOption) -> None:
    """Check a version and make it the active model of its kind; running workers pick it up."""
    from contract.bundle import BundleError

    settings, registry = _open(config)
    try:
        event = registry.promote(version, kind=kind.value if kind else None, reason=reason)
    except BundleError as exc:
        raise _refused("Promotion refused (the active model is unchanged)", exc) from None
    if event is None:
        console.print(f"{version} is already the active model")
        return
    console.print(f"[green]active {event.kind} model[/]: {event.to_version} (was {event.from_version or 'the demo bundle'})")
    _reanalyse_after(settings, event.kind)


@models_app.command("rollback")
def rollback(kind: Kind = typer.Option(Kind.radiograph, "--kind", "-k", help="the kind whose model goes back"),
             reason: Optional[str] = ReasonOption, config: Optional[Path] = ConfigOption) -> None:
    """Make the previously active version of a kind active again (checked first)."""
    from contract.bundle import BundleError

    settings, registry = _open(config)
    try:
        event = registry.rollback(kind.value, reason=reason)
    except BundleError as exc:
        raise _refused("Rollback refused (the active model is unchanged)", exc) from None
    console.print(f"[green]active {kind.value} model[/]: {event.to_version or 'the demo bundle'} (was {event.from_version})")
    _reanalyse_after(settings, kind.value)


def _reanalyse_after(settings, kind: str) -> None:
    """PLEURA_REANALYSE_HOURS_ON_PROMOTE: the recent studies, again with the new radiograph model."""
    from node.reanalyse import reanalyse_after_promotion

    if kind == "radiograph" and settings.reanalyse_hours_on_promote > 0:
        done = reanalyse_after_promotion(settings)
        console.print(f"{len(done.refs)} stud(ies) of the last {settings.reanalyse_hours_on_promote:g} h will be analysed again")


@models_app.command("fetch")
def fetch(name: str = typer.Argument(..., help="a torchxrayvision weights name, e.g. densenet121-res224-all"),
          from_file: Optional[Path] = typer.Option(
              None, "--from-file", help="the published weights file, copied here (offline); default: download it"),
          config: Optional[Path] = ConfigOption) -> None:
    """Build a classifier-only bundle around a published chest X-ray classifier and import it (not promoted)."""
    from contract.active import RegistryError
    from contract.bundle import BundleError
    from training.pretrained import PretrainedError, fetch_pretrained

    settings, registry = _open(config)
    try:
        record, added = fetch_pretrained(registry, name, from_file)
    except (PretrainedError, BundleError, RegistryError) as exc:
        raise _refused("Refused", exc) from None
    if added:
        console.print(
            f"[green]imported[/] {record.id} (research use; validate locally): tune it on local data "
            f"(pleura tune --min-sensitivity), evaluate it, then pleura models promote {record.id}"
        )
    else:
        console.print(f"{record.id} is already registered with the same files")


@models_app.command("compose")
def compose(classifier: str = typer.Argument(..., help="the version (NAME/VERSION) or bundle directory whose classifier to take"),
            segmenter: str = typer.Argument(..., help="the version (NAME/VERSION) or bundle directory whose U-Net to take"),
            name: Optional[str] = typer.Option(None, "--name", help="the new bundle's name (default: CLASSIFIER+SEGMENTER names)"),
            config: Optional[Path] = ConfigOption) -> None:
    """Pair one bundle's classifier with another's U-Net as a new bundle and import it (not promoted)."""
    from contract.active import RegistryError
    from contract.bundle import BundleError
    from training.compose import ComposeError, compose_into_registry

    _, registry = _open(config)
    try:
        record, added = compose_into_registry(registry, classifier, segmenter, name=name)
    except (ComposeError, BundleError, RegistryError) as exc:
        raise _refused("Refused", exc) from None
    if added:
        console.print(
            f"[green]imported[/] {record.id}: the pair was never validated together - evaluate it "
            f"(pleura evaluate), tune it, then pleura models promote {record.id}"
        )
    else:
        console.print(f"{record.id} is already registered with the same files")
