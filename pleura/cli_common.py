"""What every `pleura` command module shares: the console, the settings and logging set-up, the
data set options, and the one-line report of an expected failure (:class:`PleuraGroup`)."""

from __future__ import annotations

import json
import logging
import re
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from config.errors import PleuraError
from config.secrets import mask_text
from config.settings import CONFIG_FILE_ENV, Settings, SettingsError, load_settings
from node.logs import configure_logging

console = Console(stderr=True, soft_wrap=True)  # progress and messages; they stay whole for logs and grep
results = Console(soft_wrap=True)  # a command's result (tables, reports): stdout, for pipes and files


def print_json(data: Any) -> None:
    """A command's result as JSON on stdout (``--json``): dates as ISO text, paths as strings."""
    print(json.dumps(data, indent=2, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)))


JsonOption = typer.Option(False, "--json", help="print the result as JSON on stdout")


class DataFormat(str, Enum):
    """The data set layouts `read_dataset()` reads (a choice --help lists and completion offers)."""

    siim = "siim"
    cxr14 = "cxr14"
    archive = "archive"


DEVICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:2", "cuda:3")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str) -> str:
    if not _DEVICE.match(value.strip().lower()):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
    return value.strip().lower()


def _complete_device(incomplete: str) -> list[str]:
    return [device for device in DEVICES if device.startswith(incomplete)]


def device_option(help_text: str = "auto, cpu, cuda or cuda:N") -> Any:
    """``--device``: the fixed choices plus ``cuda:N``, checked before anything loads, offered by completion."""
    return typer.Option("auto", "--device", help=help_text, callback=_check_device, autocompletion=_complete_device)


def complete_preset(incomplete: str) -> list[str]:
    """Shell completion of ``--preset``: the recipes of training/presets.py."""
    from training.presets import PRESETS

    return [name for name in PRESETS if name.startswith(incomplete)]

ConfigOption = typer.Option(
    None, "--config", "-c", help=f"TOML settings file (same keys as the PLEURA_* variables; also {CONFIG_FILE_ENV})"
)
DataOption = typer.Option(
    ..., "--data", "-d", help="data set directory (SIIM-ACR or ChestX-ray14 layout, or a Pleura storage directory)"
)
LabelsOption = typer.Option(
    None, "--rle", "--labels", help="label file: SIIM train-rle.csv or ChestX-ray14 Data_Entry_2017*.csv (default: found in --data)"
)
FormatOption = typer.Option(
    None, "--format", help="the layout; archive: a Pleura storage directory with feedback (default: detected)"
)
SkipBadOption = typer.Option(False, "--skip-bad", help="leave out unusable images and report them, instead of stopping")

DEBUG_KEY = "pleura.debug"


class PleuraGroup(TyperGroup):
    """The `pleura` command group: an expected failure (:class:`PleuraError`) that no command
    reported itself ends in one line and exit code 2; its traceback only with ``--debug``."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PleuraError as exc:
            if ctx.meta.get(DEBUG_KEY):
                raise
            console.print(f"[bold red]Error[/]: {mask_text(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(2) from None


def settings_or_exit(config: Optional[Path], **overrides) -> Settings:
    """The settings, or exit 2 with the reason."""
    try:
        settings = load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        console.print(f"[bold red]Configuration error[/]: {mask_text(str(exc))}")
        raise typer.Exit(2) from None
    return settings


def setup_logging(verbose: bool, quiet: bool = False, log_format: str = "text") -> None:
    configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format)


def read_data(data: Path, labels: Optional[Path], data_format: "DataFormat | str | None", skip_bad: bool):
    from training.datasets import DatasetError, read_dataset

    data_format = getattr(data_format, "value", data_format)  # DataFormat, or its value
    if data_format not in (None, *DataFormat.__members__):
        console.print(f"[bold red]--format[/] must be siim, cxr14 or archive, not {data_format!r}")
        raise typer.Exit(2)
    try:
        index = read_dataset(data, labels, kind=data_format, skip_bad=skip_bad)  # type: ignore[arg-type]
    except DatasetError as exc:
        console.print(f"[bold red]Data error[/]: {exc}")
        raise typer.Exit(2) from None
    return index


def data_summary(index) -> dict[str, Any]:
    """What a data set holds, as JSON (``pleura dataset check --json``)."""
    return {
        "kind": index.kind, "root": str(index.root), "label_file": str(index.label_file),
        "images": len(index.examples), "positives": index.positives, "summary": index.describe(),
        "skipped": [str(problem) for problem in index.problems], "unlabelled": [str(path) for path in index.unlabelled],
    }


def report_data(index, limit: int = 20, to: Console = console) -> None:
    """What was read and what was left out: progress of a command that trains or measures (stderr),
    the result of `pleura dataset check` (``to=results``, stdout)."""
    console = to
    console.print(index.describe())
    for problem in index.problems[:limit]:
        console.print(f"[yellow]skipped[/] {problem}")
    if len(index.problems) > limit:
        console.print(f"[yellow]... and {len(index.problems) - limit} more skipped[/]")
    for path in index.unlabelled[:limit]:
        console.print(f"[yellow]no label row[/] {path} (not used)")
    if len(index.unlabelled) > limit:
        console.print(f"[yellow]... and {len(index.unlabelled) - limit} more images without a label row[/]")


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        console.print(f"[bold red]--split[/] takes three fractions train,val,test (e.g. 0.7,0.15,0.15), not {text!r}")
        raise typer.Exit(2)
    return values  # type: ignore[return-value]
