"""The model quality commands of `pleura`: `evaluate`, `tune` and `compare`.

Registered on the main app by :func:`register_quality_commands`; the work is done
in :mod:`training.evaluate`, :mod:`training.report`, :mod:`training.tune` and :mod:`training.compare`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from contract.active import active_bundle_dir
from pleura.cli_common import (
    ConfigOption,
    DataOption,
    DataFormat,
    FormatOption,
    JsonOption,
    LabelsOption,
    SkipBadOption,
    complete_preset,
    console,
    device_option,
    print_json,
    results,
    parse_fractions,
    read_data,
    report_data,
    settings_or_exit,
)

ModelOption = typer.Option(None, "--model", "-m", help="model bundle directory (default: the configured model bundle)")
SplitFileOption = typer.Option(
    None, "--split-file", help="split file (default: the one recorded with the bundle's training run, if it fits)"
)
DeviceOption = device_option()


class TuneTarget(str, Enum):
    """What `pleura tune` optimises (with --min-sensitivity: the most specific thresholds that reach it)."""

    leaderboard = "leaderboard"
    sensitivity = "sensitivity"
BatchOption = typer.Option(8, "--batch-size", help="images per forward pass")


def _fail(kind: str, exc: Exception) -> typer.Exit:
    console.print(f"[bold red]{kind}[/]: {exc}")
    return typer.Exit(2)


def _load(model: Optional[Path], config: Optional[Path], device: str):
    from contract.bundle import BundleError, load_bundle
    from contract.networks import load_models

    try:
        bundle = load_bundle(model or active_bundle_dir(settings_or_exit(config)))
        return bundle, load_models(bundle, device)
    except (BundleError, ValueError) as exc:
        raise _fail("Model bundle error", exc) from None


def _held_out(index, bundle, split: str, split_file: Optional[Path]):
    from training.datasets import DatasetError
    from training.evaluate import EvaluationError, held_out_examples

    try:
        held = held_out_examples(index, bundle, split, split_file)
    except (DatasetError, EvaluationError) as exc:
        raise _fail("Split error", exc) from None
    style = "bold yellow" if held.split == "all" else "cyan"
    console.print(f"[{style}]{held.note}[/]: {len(held.examples)} images, "
                  f"{sum(e.positive for e in held.examples)} with pneumothorax")
    return held


def _run_evaluation(bundle, models, index, held, out: Path, *, batch_size: int, cases: int,
                    predictions: Optional[Path]):
    from training.datasets import DatasetError
    from training.eval_output import write_evaluation
    from training.evaluate import evaluate_bundle
    from contract.preprocess import ImageDecodeError

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"evaluating {bundle.identity.label}", total=len(held.examples))
        try:
            evaluation = evaluate_bundle(bundle, models, index, held, batch_size=batch_size, cases_per_group=cases,
                                         on_images=lambda done: bar.update(task, completed=done))
        except (DatasetError, ImageDecodeError, OSError) as exc:
            raise _fail("Data error", exc) from None
    written = write_evaluation(evaluation, out, predictions)
    return evaluation, written


def _summary_table(metrics: dict, title: str) -> Table:
    from training.compare import format_cell

    classification, decided, segmentation = metrics["classification"], metrics["decision"], metrics["segmentation"]
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    ci = classification.get("auc_ci95")
    rows = [
        ("images (with pneumothorax)", f"{metrics['images']} ({metrics['positives']})"),
        ("classifier ROC AUC (95% CI)", format_cell(classification.get("auc"))
         + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")),
        ("classifier sensitivity / specificity",
         f"{format_cell(classification.get('sensitivity'))} / {format_cell(classification.get('specificity'))}"),
        ("U-Net Dice / IoU on positives", f"{format_cell(segmentation.get('dice'))} / {format_cell(segmentation.get('iou'))}"),
        ("decision sensitivity / specificity",
         f"{format_cell(decided.get('sensitivity'))} / {format_cell(decided.get('specificity'))}"),
        ("decision precision / F1", f"{format_cell(decided.get('precision'))} / {format_cell(decided.get('f1'))}"),
        ("SIIM-ACR leaderboard metric", format_cell(decided.get("leaderboard"))),
        ("time per image", f"{1000 * metrics['resources']['seconds_per_image']:.1f} ms "
                           f"({metrics['resources']['device']})"),
        ("peak memory", f"{format_cell(metrics['resources'].get('peak_memory_mb'))} MB"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def evaluate(
    model: Optional[Path] = ModelOption,
    data: Path = DataOption,
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[DataFormat] = FormatOption,
    out: Path = typer.Option(..., "--out", "-o", help="folder for metrics.json, per_image.csv, report.html, plots/"),
    split_file: Optional[Path] = SplitFileOption,
    split: str = typer.Option("test", "--split", help="which split of the split file: test (default), val or train"),
    predictions: Optional[Path] = typer.Option(
        None, "--predictions", help="also write the decisions in the SIIM-ACR submission format (ImageId,EncodedPixels)"
    ),
    cases: int = typer.Option(4, "--cases", help="images per group (best, worst, borderline) in the report"),
    device: str = DeviceOption,
    batch_size: int = BatchOption,
    skip_bad: bool = SkipBadOption,
    config: Optional[Path] = ConfigOption,
    json_output: bool = JsonOption,
) -> None:
    """Measure a bundle on held-out images: classifier, U-Net, the node's decision, time and memory; write a report."""
    if split not in ("train", "val", "test"):
        raise _fail("Split error", ValueError(f"--split must be train, val or test, not {split!r}"))
    bundle, models = _load(model, config, device)
    index = read_data(data, labels, data_format, skip_bad)
    report_data(index)
    held = _held_out(index, bundle, split, split_file)
    evaluation, written = _run_evaluation(bundle, models, index, held, out, batch_size=batch_size, cases=cases,
                                          predictions=predictions)
    files = {name: str(written[name]) for name in ("report", "metrics", "per_image", "predictions") if name in written}
    if json_output:
        print_json({"bundle": bundle.identity.label, "split": held.split, "metrics": evaluation.metrics, "written": files})
        return
    results.print(_summary_table(evaluation.metrics, f"{bundle.identity.label} on {held.split}"))
    for path in files.values():
        console.print(f"[green]written[/] {path}")


def _float_list(text: Optional[str], option: str, kind=float) -> Optional[list]:
    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise _fail("Option error", ValueError(f"{option} takes comma-separated numbers, not {text!r}"))
    return values


def tune(
    model: Optional[Path] = ModelOption,
    data: Path = DataOption,
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[DataFormat] = FormatOption,
    split_file: Optional[Path] = SplitFileOption,
    target: Optional[TuneTarget] = typer.Option(None, "--target", help="what to optimise (default: leaderboard)"),
    min_sensitivity: Optional[float] = typer.Option(
        None, "--min-sensitivity", min=0.0, max=1.0,
        help="the most specific thresholds whose decision sensitivity reaches this (triage), e.g. 0.95",
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="write a tuned copy of the bundle here (new version) instead of changing it in place"
    ),
    version: Optional[str] = typer.Option(None, help="version of the tuned copy (with --out)"),
    probabilities: Optional[str] = typer.Option(None, help="probability thresholds to try, e.g. 0.2,0.3,0.5"),
    mask_thresholds: Optional[str] = typer.Option(None, help="mask pixel thresholds to try, e.g. 0.3,0.5"),
    min_areas: Optional[str] = typer.Option(None, help="minimum areas to try (source pixels), e.g. 0,256,2048"),
    device: str = DeviceOption,
    batch_size: int = BatchOption,
    skip_bad: bool = SkipBadOption,
    config: Optional[Path] = ConfigOption,
    json_output: bool = JsonOption,
) -> None:
    """Choose the decision thresholds (probability, mask, minimum area) on the validation split and write them into the bundle."""
    from training.evaluate import collect_statistics, summarise
    from training.tune import Grid, Target, TuneError, check_in_place, default_grid, default_mask_grid
    from training.tune import tune as run_tune
    from training.tune import tuning_record, write_tuned_bundle

    target = getattr(target, "value", target)
    if target not in (None, "leaderboard", "sensitivity"):
        raise _fail("Option error", ValueError(f"--target must be leaderboard or sensitivity, not {target!r}"))
    if target == "sensitivity" and min_sensitivity is None:
        raise _fail("Option error", ValueError("--target sensitivity needs --min-sensitivity (e.g. 0.95)"))
    if target == "leaderboard" and min_sensitivity is not None:
        raise _fail("Option error", ValueError("give --target leaderboard or --min-sensitivity, not both"))
    chosen_target = Target("min_sensitivity", min_sensitivity) if min_sensitivity is not None else Target("leaderboard")
    bundle, models = _load(model, config, device)
    index = read_data(data, labels, data_format, skip_bad)
    if chosen_target.kind == "leaderboard" and not index.has_masks:
        raise _fail("Tuning error", ValueError(
            f"the leaderboard target needs true masks; {index.kind} data has none (use --min-sensitivity)"))
    if out is None:
        try:
            check_in_place(bundle, version)
        except TuneError as exc:
            raise _fail("Tuning error", exc) from None
    report_data(index)
    held = _held_out(index, bundle, "val", split_file)
    if held.split == "all":
        raise _fail("Split error", ValueError(
            "tuning needs a validation split that the model was not tested on: give --split-file "
            "(`pleura dataset split`, or the OUT/splits.csv of the training run)"))
    current = bundle.manifest.thresholds
    masks = _float_list(mask_thresholds, "--mask-thresholds") or list(default_mask_grid(current))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("running the networks on the validation images", total=len(held.examples))
        stats = collect_statistics(models, held.examples, masks, with_masks=index.has_masks, batch_size=batch_size,
                                   profile_images=0, on_images=lambda done: bar.update(task, completed=done))
    grid = default_grid(stats, current)
    grid = Grid(
        probabilities=tuple(sorted(set(_float_list(probabilities, "--probabilities") or grid.probabilities))),
        mask_thresholds=grid.mask_thresholds,
        min_areas=tuple(sorted(set(_float_list(min_areas, "--min-areas", int) or grid.min_areas))),
    )
    try:
        result = run_tune(stats, chosen_target, grid)
    except TuneError as exc:
        raise _fail("Tuning error", exc) from None
    table = Table(title=f"validation ({len(held.examples)} images): {chosen_target.describe()}")
    for column in ("thresholds", "probability", "mask", "min area px", "sensitivity", "specificity", "leaderboard"):
        table.add_column(column, justify="right")
    from training.compare import format_cell

    rows = [("tuned", result.thresholds, result.metrics)]
    if current.mask in stats.mask_thresholds:
        rows.insert(0, ("before", current, summarise(stats, current)))
    for name, thresholds, metrics in rows:
        decided = metrics["decision"]
        table.add_row(name, f"{thresholds.probability:g}", f"{thresholds.mask:g}", str(thresholds.min_area_px),
                      format_cell(decided.get("sensitivity")), format_cell(decided.get("specificity")),
                      format_cell(decided.get("leaderboard")))
    if not json_output:
        results.print(table)
    record = tuning_record(bundle, result, chosen_target, held, index.describe())
    try:
        tuned = write_tuned_bundle(bundle, result.thresholds, record, out=out, version=version)
    except (TuneError, OSError) as exc:
        raise _fail("Tuning error", exc) from None
    if json_output:
        print_json({"bundle": str(tuned.path), "label": tuned.identity.label, "target": chosen_target.describe(),
                    "validation_images": len(held.examples), "thresholds": result.thresholds.model_dump(mode="json"),
                    "metrics": result.metrics})
        return
    console.print(f"[green]thresholds written[/] to {tuned.path / 'manifest.json'} ({tuned.identity.label})")


def compare(
    preset_names: list[str] = typer.Option([], "--preset", "-p", autocompletion=complete_preset, help="preset to train and evaluate (repeat)"),
    models_given: list[Path] = typer.Option([], "--model", "-m", help="bundle to evaluate as it is (repeat)"),
    data: Path = DataOption,
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[DataFormat] = FormatOption,
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="folder for the runs, compare.csv, compare.md"),
    evaluate_only: bool = typer.Option(
        False, "--evaluate-only", help="do not train: evaluate the bundles an earlier compare left in OUT/PRESET/bundle"
    ),
    base: Optional[Path] = typer.Option(None, help="bundle supplying the other network (default: the configured one)"),
    split_file: Optional[Path] = typer.Option(None, help="split file shared by every run (default: made by the first)"),
    split: str = typer.Option("0.7,0.15,0.15", "--split", help="train,val,test fractions for a new split"),
    epochs: Optional[int] = typer.Option(None, help="override for every preset: maximum epochs"),
    batch_size: Optional[int] = typer.Option(None, help="override for every preset: batch size"),
    input_size: Optional[int] = typer.Option(None, help="override for every preset: input side, pixels"),
    steps_per_epoch: Optional[int] = typer.Option(None, help="override for every preset: cap on batches per epoch"),
    set_: list[str] = typer.Option([], "--set", help="override for every preset: KEY=VALUE (JSON)"),
    cases: int = typer.Option(2, "--cases", help="images per group in each model's report"),
    device: str = DeviceOption,
    cache_dir: Optional[Path] = typer.Option(None, help="resized image cache (default: user cache dir)"),
    skip_bad: bool = SkipBadOption,
    config: Optional[Path] = ConfigOption,
) -> None:
    """Train (or take) several models, evaluate them on one split, and tabulate quality against time and memory."""
    from contract.bundle import BundleError, load_bundle
    from training.compare import COLUMNS, CompareEntry, comparison_rows, format_cell, write_comparison
    from training.datasets import DatasetError
    from training.presets import PresetError, get_preset, parse_override, with_overrides
    from training.trainer import BUNDLE_DIR, SPLITS_FILE, TrainingError, train as run_training
    from contract.networks import load_models

    if not preset_names and not models_given:
        raise _fail("Option error", ValueError("give at least one --preset or --model"))
    try:
        overrides = dict(parse_override(item) for item in set_)
        flags = {"epochs": epochs, "batch_size": batch_size, "input_size": input_size,
                 "steps_per_epoch": steps_per_epoch}
        chosen = {**overrides, **{k: v for k, v in flags.items() if v is not None}}
        presets = [with_overrides(get_preset(name), chosen) for name in preset_names]
    except PresetError as exc:
        raise _fail("Preset error", exc) from None
    index = read_data(data, labels, data_format, skip_bad)
    report_data(index)
    fractions = parse_fractions(split)

    bundles: list[tuple[str, Optional[str], Optional[str], object]] = []
    shared_split = split_file
    if presets and not evaluate_only:
        try:
            base_bundle = load_bundle(base or active_bundle_dir(settings_or_exit(config)))
        except BundleError as exc:
            raise _fail("Base bundle error", exc) from None
    for preset in presets:
        run_dir = out / preset.name
        if evaluate_only:
            try:
                trained = load_bundle(run_dir / BUNDLE_DIR)
            except BundleError as exc:
                raise _fail("Model bundle error", exc) from None
        else:
            console.print(f"training {preset.name} ({preset.network_role}) in {run_dir}")
            try:
                trained = run_training(preset, index, run_dir, base=base_bundle, split_file=shared_split,
                                       fractions=fractions, device=device, cache_root=cache_dir, skip_bad=skip_bad,
                                       console=console).bundle
            except (TrainingError, DatasetError, BundleError, ValueError) as exc:
                raise _fail("Training error", exc) from None
        if shared_split is None and (run_dir / SPLITS_FILE).is_file():
            shared_split = run_dir / SPLITS_FILE
        bundles.append((preset.name, preset.name, preset.network_role, trained))
    for path in models_given:
        try:
            given = load_bundle(path)
        except BundleError as exc:
            raise _fail("Model bundle error", exc) from None
        bundles.append((f"{given.manifest.name} {given.manifest.version}", None, None, given))

    labels_seen: dict[str, int] = {}
    entries: list[CompareEntry] = []
    note = ""
    for label, preset_name, role, bundle in bundles:
        labels_seen[label] = labels_seen.get(label, 0) + 1
        if labels_seen[label] > 1:
            label = f"{label} ({labels_seen[label]})"
        held = _held_out(index, bundle, "test", shared_split)
        if shared_split is None and held.split_file is not None:
            shared_split = held.split_file  # the first bundle's recorded split serves every bundle
        note = f"Evaluated on {held.note}; {len(held.examples)} images, {sum(e.positive for e in held.examples)} with pneumothorax."
        try:
            models = load_models(bundle, device)
        except (BundleError, ValueError) as exc:
            raise _fail("Model bundle error", exc) from None
        folder = out / preset_name / "evaluation" if preset_name else out / "models" / f"{len(entries):02d}"
        evaluation, _ = _run_evaluation(bundle, models, index, held, folder, batch_size=8, cases=cases,
                                        predictions=None)
        console.print(f"{label}: report {folder / 'report.html'}")
        entries.append(CompareEntry(label, preset_name, role, evaluation))

    rows = comparison_rows(entries)
    csv_path, md_path = write_comparison(rows, out, note)
    table = Table(title="quality against time and memory (" + note.rstrip(".") + ")")
    shown = [(key, header) for key, header in COLUMNS if key not in ("bundle", "auc_ci95", "images", "device")]
    for _, header in shown:
        table.add_column(header, justify="left" if header in ("model", "preset", "trained network") else "right")
    for row in rows:
        table.add_row(*(format_cell(row[key]) for key, _ in shown))
    Console(width=200).print(table)
    console.print(f"[green]written[/] {csv_path} and {md_path}")


def register_quality_commands(app: typer.Typer) -> None:
    """Add `evaluate`, `tune` and `compare` to the `pleura` command."""
    for command in (evaluate, tune, compare):
        app.command()(command)
