"""`pleura train`: train one network (or a classifier and a U-Net in turn) into a model bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from contract.active import active_bundle_dir
from pleura.cli_common import (
    ConfigOption,
    DataFormat,
    FormatOption,
    JsonOption,
    LabelsOption,
    SkipBadOption,
    complete_preset,
    console,
    device_option,
    parse_fractions,
    read_data,
    print_json,
    report_data,
    settings_or_exit,
)
from pleura.dataset_cli import export_feedback, feedback_source
from pleura.models_cli import import_into_registry


def _list_presets(value: bool) -> None:
    if not value:
        return
    from rich.table import Table

    from training.presets import PRESETS

    table = Table(title="pleura train presets")
    for column in ("preset", "network", "input", "loss / training", "from"):
        table.add_column(column, no_wrap=column == "preset")
    for preset in PRESETS.values():
        network = preset.architecture + (f" ({preset.encoder})" if preset.encoder else "")
        notes = [preset.loss, preset.optimiser, f"lr {preset.lr:g}", f"batch {preset.batch_size}", f"<= {preset.epochs} epochs"]
        if preset.positives_only:
            notes.append("positives only")
        if preset.scheduler != "none":
            notes.append(f"{preset.scheduler} LR")
        table.add_row(preset.name, network, f"{preset.input_size} px x{preset.channels}", ", ".join(notes), preset.source)
    Console().print(table)
    raise typer.Exit()


def _training_data(data, labels, data_format, skip_bad, from_feedback, feedback_storage, out, resume, config):
    """The data set `pleura train` reads: --data, the feedback exported to OUT/feedback-data, or
    both merged (the feedback last, so its labels win for an image in both)."""
    from training.datasets import merge_datasets
    from training.feedback_dataset import FEEDBACK_DATA_DIR

    indexes = []
    if data is not None:
        indexes.append(read_data(data, labels, data_format, skip_bad))
        report_data(indexes[-1])
    if from_feedback:
        exported = out / FEEDBACK_DATA_DIR
        if not (resume and exported.is_dir()):  # a resumed run keeps the data it started with
            source, ledger_url = feedback_source(config, feedback_storage)
            export_feedback(source, ledger_url, exported, skip_bad=skip_bad)
        indexes.append(read_data(exported, None, "siim", skip_bad))
    index = merge_datasets(indexes)
    if len(indexes) > 1:
        report_data(index)
    return index


def train(
    preset_names: list[str] = typer.Option(
        ..., "--preset", "-p", autocompletion=complete_preset,
        help="recipe name (see --list-presets); give a classifier and a U-Net preset to train both networks",
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", "-d",
        help="data set directory (SIIM-ACR or ChestX-ray14 layout, or a Pleura storage directory); with --from-feedback, trained on together",
    ),
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[DataFormat] = FormatOption,
    from_feedback: bool = typer.Option(
        False, "--from-feedback",
        help="also train on the radiologists' feedback: exported to OUT/feedback-data (SIIM-ACR layout) first",
    ),
    feedback_storage: Optional[Path] = typer.Option(
        None, help="with --from-feedback: a storage directory with its SQLite ledger (default: the configured one)"
    ),
    out: Path = typer.Option(Path("runs/latest"), "--out", "-o", help="run directory (checkpoints, metrics, bundle)"),
    base: Optional[Path] = typer.Option(
        None, help="bundle that supplies the other network (default: the configured model bundle)"
    ),
    split_file: Optional[Path] = typer.Option(None, help="existing split file (default: OUT/splits.csv, made once)"),
    split: str = typer.Option("0.7,0.15,0.15", "--split", help="train,val,test fractions for a new split"),
    epochs: Optional[int] = typer.Option(None, help="override: maximum epochs"),
    batch_size: Optional[int] = typer.Option(None, help="override: batch size"),
    lr: Optional[float] = typer.Option(None, help="override: learning rate"),
    input_size: Optional[int] = typer.Option(None, help="override: network input side, pixels"),
    clahe: Optional[bool] = typer.Option(None, "--clahe/--no-clahe", help="override: CLAHE in the preprocessing"),
    imbalance: Optional[str] = typer.Option(None, help="override: none, weight (loss) or sample (sampler)"),
    encoder_weights: Optional[str] = typer.Option(None, help="override: none, or imagenet (downloads; online only)"),
    patience: Optional[int] = typer.Option(None, help="override: early-stopping patience, epochs (0: off)"),
    steps_per_epoch: Optional[int] = typer.Option(None, help="override: cap on batches per epoch"),
    seed: Optional[int] = typer.Option(None, help="override: random seed"),
    set_: list[str] = typer.Option([], "--set", help="override any preset setting: KEY=VALUE (JSON), e.g. augment.flip_p=0.5"),
    device: str = device_option("auto, cpu, cuda or cuda:N (mixed precision on CUDA)"),
    resume: bool = typer.Option(False, help="continue the interrupted run in OUT"),
    cache_dir: Optional[Path] = typer.Option(None, help="where the resized image cache lives (default: user cache dir)"),
    skip_bad: bool = SkipBadOption,
    name: Optional[str] = typer.Option(None, help="bundle name (default: pleura-PRESET)"),
    version: Optional[str] = typer.Option(None, help="bundle version (default: a UTC timestamp)"),
    intended_use: Optional[str] = typer.Option(
        None, help="the bundle's intended-use line (a bundle with any synthetic part always says SYNTHETIC DEMO MODEL)"
    ),
    config: Optional[Path] = ConfigOption,
    list_presets: bool = typer.Option(
        False, "--list-presets", callback=_list_presets, is_eager=True, help="list the presets and exit"
    ),
    register: bool = typer.Option(False, "--register", help="import the bundle into the model registry (not promoted)"),
    json_output: bool = JsonOption,
) -> None:
    """Train a preset's network and write a model bundle that `pleura worker` runs unchanged.

    With one preset the bundle's other network comes from --base. With a classifier and a U-Net
    preset both are trained on the same split, each in OUT/PRESET, and OUT/<second preset>/bundle
    holds both.
    """
    from contract.bundle import BundleError, load_bundle
    from training.datasets import DatasetError
    from training.presets import PresetError, get_preset, parse_override, with_overrides
    from training.trainer import TrainingError, check_pair, train_in_turn

    try:
        overrides = dict(parse_override(item) for item in set_)
        flags = {
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "input_size": input_size, "clahe": clahe,
            "imbalance": imbalance, "encoder_weights": encoder_weights, "patience": patience,
            "steps_per_epoch": steps_per_epoch, "seed": seed,
        }
        chosen = {**overrides, **{k: v for k, v in flags.items() if v is not None}}
        presets = [with_overrides(get_preset(name_), chosen) for name_ in preset_names]
    except PresetError as exc:
        console.print(f"[bold red]Preset error[/]: {exc}")
        raise typer.Exit(2) from None
    if len(presets) == 1 and presets[0].kind == "ct":
        from pleura.ct_cli import train_ct_command

        explicit_split = parse_fractions(split) if split != "0.7,0.15,0.15" else None  # else the preset's 64/16/20
        return train_ct_command(presets[0], data, out, split_file, explicit_split, device, name, version,
                                intended_use, skip_bad, console)
    try:
        check_pair(presets)
    except PresetError as exc:
        console.print(f"[bold red]Preset error[/]: {exc}")
        raise typer.Exit(2) from None
    if data is None and not from_feedback:
        console.print("[bold red]No data[/]: give --data, --from-feedback, or both")
        raise typer.Exit(2)
    try:
        current_base = load_bundle(base or active_bundle_dir(settings_or_exit(config)))
    except BundleError as exc:
        console.print(f"[bold red]Base bundle error[/]: {exc}")
        raise typer.Exit(2) from None
    index = _training_data(data, labels, data_format, skip_bad, from_feedback, feedback_storage, out, resume, config)
    fractions = parse_fractions(split)
    try:
        result = train_in_turn(
            presets, index, out, base=current_base, split_file=split_file, fractions=fractions,
            device=device, resume=resume, cache_root=cache_dir, skip_bad=skip_bad, name=name,
            version=version, intended_use=intended_use, console=console,
        )
    except (TrainingError, DatasetError, BundleError, ValueError) as exc:
        console.print(f"[bold red]Training error[/]: {exc}")
        raise typer.Exit(2) from None
    manifest = result.bundle.manifest
    if json_output:
        print_json({"bundle": str(result.bundle.path), "name": manifest.name, "version": manifest.version,
                    "label": result.bundle.identity.label, "metrics": manifest.metrics})
    else:
        print(json.dumps(manifest.metrics, indent=2))  # the result: stdout
    if register:
        import_into_registry(settings_or_exit(config), result.bundle.path)
    else:
        console.print(f"use it: pleura models import {result.bundle.path} (or PLEURA_MODEL_BUNDLE_DIR={result.bundle.path})")
