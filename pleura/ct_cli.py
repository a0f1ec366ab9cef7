"""The CT parts of the `pleura` command: `pleura dataset synthetic-ct`, and CT presets of `pleura train`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


class MaskFormat(str, Enum):
    """How the synthetic CT truth is written: a DICOM SEG or a NIfTI mask."""

    seg = "seg"
    nifti = "nifti"


def register(dataset_app: typer.Typer, console: Console) -> None:
    """Add the CT data set command to `pleura dataset`."""

    @dataset_app.command("synthetic-ct")
    def dataset_synthetic_ct(
        out: Path = typer.Argument(..., help="directory to write the CT cases into"),
        cases: int = typer.Option(20, "--cases", help="number of CT series (one phantom each)"),
        slices: int = typer.Option(40, help="axial slices per series"),
        size: int = typer.Option(128, help="slice side, pixels"),
        mask_format: MaskFormat = typer.Option(MaskFormat.seg, "--mask-format", help="truth as seg (DICOM SEG) or nifti"),
        seed: int = typer.Option(0),
    ) -> None:
        """Generate SYNTHETIC chest CT phantoms with a pneumothorax of known volume (no patient data)."""
        from rich.progress import Progress

        from training.ct_synthetic import write_ct_dataset

        with Progress(console=console) as bar:
            task = bar.add_task("generating CT phantoms", total=cases)
            write_ct_dataset(
                out, cases, slices=slices, size=size, mask_format=mask_format.value, seed=seed,  # type: ignore[arg-type]
                on_case=lambda done: bar.update(task, completed=done),
            )
        console.print(f"[green]written[/] {out}: {cases} SYNTHETIC CT series (not patients), masks as {mask_format.value}")


def train_ct_command(
    preset, data: Path, out: Path, split_file: Optional[Path], split: Optional[tuple[float, float, float]],
    device: str, name: Optional[str], version: Optional[str], intended_use: Optional[str], skip_bad: bool,
    console: Console,
) -> None:
    """`pleura train` with a CT preset: read the CT cases, train, print the metrics."""
    from training.ct_datasets import read_ct_dataset
    from training.ct_trainer import train_ct
    from training.datasets import DatasetError
    from training.trainer import TrainingError

    try:
        index = read_ct_dataset(data, skip_bad=skip_bad)
        console.print(index.describe())
        for problem in index.problems:
            console.print(f"[yellow]skipped[/] {problem}")
        result = train_ct(
            preset, index, out, split_file=split_file, fractions=split, device=device, name=name, version=version,
            intended_use=intended_use, console=console,
        )
    except (TrainingError, DatasetError, ValueError) as exc:
        console.print(f"[bold red]Training error[/]: {exc}")
        raise typer.Exit(2) from None
    console.print(json.dumps(result.bundle.manifest.metrics, indent=2))
    console.print(f"use it: PLEURA_CT_MODEL_DIR={result.bundle.path} pleura worker --queues ct")
