"""`pleura dataset …`: check a data set, write a patient-level split, generate a synthetic set,
export the radiologists' feedback as a training set (CT commands: pleura/ct_cli.py)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from pleura.cli_common import (
    ConfigOption,
    DataFormat,
    DataOption,
    FormatOption,
    JsonOption,
    LabelsOption,
    SkipBadOption,
    console,
    data_summary,
    parse_fractions,
    print_json,
    read_data,
    report_data,
    results,
    settings_or_exit,
)
from pleura.ct_cli import register as register_ct

dataset_app = typer.Typer(
    help="Training data: check a data set, write a patient-level split, generate a synthetic set, export the feedback.",
    no_args_is_help=True,
)
register_ct(dataset_app, console)


class DateChoice(str, Enum):
    """The de-identification's date option (training.deidentify.DATE_OPTIONS), as a choice --help lists."""

    remove = "remove"
    shift = "shift"


@dataset_app.command("check")
def dataset_check(
    data: Path = DataOption,
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[DataFormat] = FormatOption,
    skip_bad: bool = SkipBadOption,
    decode: bool = typer.Option(False, help="also decode every image's pixel data (slow: the whole set is read)"),
    json_output: bool = JsonOption,
) -> None:
    """Read a data set's labels and headers; report images, patients, positives and anything unusable."""
    index = read_data(data, labels, data_format, skip_bad)
    summary = data_summary(index)
    if not json_output:
        report_data(index, to=results)
    if not decode:
        if json_output:
            print_json(summary)
        return
    from rich.progress import Progress

    from contract.bundle import Preprocessing
    from training.cache import decode_example
    from contract.preprocess import ImageDecodeError

    failures: list[str] = []
    with Progress(console=console) as bar:
        task = bar.add_task("decoding pixel data", total=len(index.examples))
        for example in index.examples:
            try:
                image = decode_example(example, Preprocessing())
                if index.has_masks and image.shape != (example.height, example.width):
                    raise ImageDecodeError(
                        f"pixel data is {image.shape}, the header says {example.height}x{example.width}"
                    )
            except (ImageDecodeError, OSError, ValueError) as exc:
                failures.append(f"{example.path}{f', row {example.rows[0]}' if example.rows else ''}: {exc}")
                if not json_output:
                    results.print(f"[bold red]cannot decode[/] {failures[-1]}")
            bar.advance(task)
    if json_output:
        print_json({**summary, "decode_failures": failures})
    if failures:
        console.print(
            f"[bold red]{len(failures)} image(s) will not decode[/] (pleura train stops on them; --skip-bad leaves them out)"
        )
        raise typer.Exit(1)
    if not json_output:
        results.print(f"[green]all {len(index.examples)} images decode[/]")


@dataset_app.command("split")
def dataset_split(
    data: Path = DataOption,
    out: Path = typer.Option(..., "--out", "-o", help="split file to write (CSV)"),
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[DataFormat] = FormatOption,
    split: str = typer.Option("0.7,0.15,0.15", "--split", help="train,val,test fractions (of patients, per class)"),
    seed: int = typer.Option(0),
    skip_bad: bool = SkipBadOption,
) -> None:
    """Write a stratified, patient-level train/val/test split, for `pleura train --split-file`."""
    from training.splits import make_splits, split_counts, write_splits

    index = read_data(data, labels, data_format, skip_bad)
    report_data(index)
    assignment = make_splits(index.examples, parse_fractions(split), seed=seed)
    write_splits(out, index.examples, assignment)
    for name, (images, positives) in split_counts(index.examples, assignment).items():
        console.print(f"{name}: {images} images, {positives} with pneumothorax")
    console.print(f"[green]written[/] {out}")


@dataset_app.command("synthetic")
def dataset_synthetic(
    out: Path = typer.Argument(..., help="directory to write the SIIM-ACR layout into"),
    n: int = typer.Option(200, "--n", help="number of images"),
    size: int = typer.Option(256, help="image side, pixels"),
    positive_fraction: float = typer.Option(0.5, help="share of images with a synthetic pneumothorax"),
    images_per_patient: int = typer.Option(1, help="images per synthetic patient"),
    split_masks: bool = typer.Option(False, help="write each mask as two RLE rows"),
    jpeg: bool = typer.Option(False, help="store 8-bit JPEG Baseline, as the SIIM-ACR files are"),
    seed: int = typer.Option(0),
) -> None:
    """Generate SYNTHETIC radiographs in the SIIM-ACR layout (for tests and demos; no patient data)."""
    from rich.progress import Progress

    from training.synthetic import write_siim_dataset

    with Progress(console=console) as bar:
        task = bar.add_task("generating synthetic radiographs", total=n)
        write_siim_dataset(
            out, n, size=size, positive_fraction=positive_fraction, seed=seed,
            on_image=lambda done: bar.update(task, completed=done),
            images_per_patient=images_per_patient, split_masks=split_masks, jpeg=jpeg,
        )
    console.print(f"[green]written[/] {out}: {n} SYNTHETIC images (not patients), SIIM-ACR layout")


def feedback_source(config: Optional[Path], storage: Optional[Path]) -> tuple[Path, Optional[str]]:
    """The storage directory whose feedback to use and its ledger: the configured ones, or the
    SQLite ledger in the directory given."""
    if storage is not None:
        return storage, None
    settings = settings_or_exit(config)
    return settings.storage_dir, settings.ledger_url


def export_feedback(storage: Path, ledger_url: Optional[str], out: Path, **options):
    from rich.progress import Progress

    from training.datasets import DatasetError
    from training.deidentify import DeidentificationError
    from training.feedback_dataset import export_feedback_dataset

    try:
        with Progress(console=console) as bar:
            task = bar.add_task("writing the labelled images", total=None)
            exported = export_feedback_dataset(
                storage, out, ledger_url=ledger_url, on_image=lambda done, total: bar.update(task, completed=done, total=total),
                **options,
            )
    except (DatasetError, DeidentificationError) as exc:
        console.print(f"[bold red]Data error[/]: {exc}")
        raise typer.Exit(2) from None
    for problem in exported.problems[:20]:
        console.print(f"[yellow]skipped[/] {problem}")
    console.print(
        f"[green]written[/] {out}: {exported.images} images ({exported.positives} with pneumothorax) from "
        f"{exported.patients} patients{', de-identified' if exported.deidentified else ''}; "
        f"{len(exported.archive.unlabelled)} images without feedback left out"
    )
    return exported


@dataset_app.command("export-feedback")
def dataset_export_feedback(
    out: Path = typer.Option(..., "--out", "-o", help="new directory to write the SIIM-ACR layout into"),
    deidentify: bool = typer.Option(
        False, help="de-identify the DICOM copies (PS3.15 Annex E Basic Profile: pseudonymous patient IDs, new UIDs)"
    ),
    dates: DateChoice = typer.Option(
        DateChoice.remove, help="with --deidentify: remove dates (basic profile) or shift them per patient (intervals kept)"
    ),
    key_file: Optional[Path] = typer.Option(
        None, help="de-identification key (default: STORAGE/deidentify.key, made on first use); same key, same pseudonyms"
    ),
    storage: Optional[Path] = typer.Option(
        None, help="a storage directory with its SQLite ledger (default: the configured PLEURA_STORAGE_DIR and ledger)"
    ),
    skip_bad: bool = SkipBadOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Write the radiologists' feedback (verdicts, corrected outlines, Segmentations sent back) as a
    training set in the SIIM-ACR layout: DICOM images, train-rle.csv and provenance.json."""
    source, ledger_url = feedback_source(config, storage)
    export_feedback(
        source, ledger_url, out, deidentify=deidentify, dates=dates.value, key_file=key_file, skip_bad=skip_bad
    )
