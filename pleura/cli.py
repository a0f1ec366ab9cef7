"""The `pleura` command: run the node and the workers, build the demo model, run the demo, train models."""

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
from contract.active import active_bundle_dir

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


def _logging(verbose: bool, quiet: bool = False, log_format: str = "text") -> None:
    from pleura.logs import configure_logging

    configure_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO, log_format)


@app.command()
def node(
    config: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    export_worker: bool = typer.Option(True, help="also run the node-side export worker (C-STORE of results)"),
) -> None:
    """Run the DICOM node: Storage SCP, ledger, study settling, dispatch and export."""
    settings = _settings(config)
    _logging(verbose, log_format=settings.log_format)
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
    _logging(verbose, log_format=settings.log_format)
    from contract.active import is_ct_demo_dir
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
    from worker.tasks import register_worker_tasks

    celery_app = make_celery(settings)
    register_worker_tasks(celery_app, build_ct_demo=_ct_demo_builder() if "ct" in kinds else None)
    start_worker_ops(settings, celery_app, verbose)  # JSON logs for Celery too; /healthz when configured
    pool = "solo" if concurrency == 1 else "prefork"
    if concurrency == 1 and settings.worker_threads > 1:  # studies at once, sharing forward passes
        pool, concurrency = "threads", settings.worker_threads
    celery_app.pleura_worker_processes = 1 if pool != "prefork" else concurrency  # torch threads per process
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


def _ct_demo_builder():
    """What a CT worker calls to build the CT demo bundle on first use, when it is the active CT
    model and is missing or outdated (the worker finds bundles; training builds them)."""
    from training.ct_demo_model import ensure_ct_demo_bundle

    return lambda target: ensure_ct_demo_bundle(target, progress=False)[0]


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
    settings = _settings(config)
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
    _logging(False, quiet=True)
    from pleura.demo import run_demo

    sys.exit(run_demo(workdir=workdir, timeout=timeout, console=Console()))


# --- training: data sets and `pleura train` -------------------------------------------------------

dataset_app = typer.Typer(
    help="Training data: check a data set, write a patient-level split, generate a synthetic set, export the feedback.",
    no_args_is_help=True,
)
app.add_typer(dataset_app, name="dataset")
from pleura.ct_cli import register as _register_ct  # noqa: E402  (CT commands: pleura/ct_cli.py)

_register_ct(dataset_app, console)

DataOption = typer.Option(
    ..., "--data", "-d", help="data set directory (SIIM-ACR or ChestX-ray14 layout, or a Pleura storage directory)"
)
LabelsOption = typer.Option(
    None, "--rle", "--labels", help="label file: SIIM train-rle.csv or ChestX-ray14 Data_Entry_2017*.csv (default: found in --data)"
)
FormatOption = typer.Option(
    None, "--format", help="siim, cxr14 or archive (a Pleura storage directory with feedback) (default: detected)"
)
SkipBadOption = typer.Option(False, "--skip-bad", help="leave out unusable images and report them, instead of stopping")


def _read_data(data: Path, labels: Optional[Path], data_format: Optional[str], skip_bad: bool):
    from training.datasets import DatasetError, read_dataset

    if data_format not in (None, "siim", "cxr14", "archive"):
        console.print(f"[bold red]--format[/] must be siim, cxr14 or archive, not {data_format!r}")
        raise typer.Exit(2)
    try:
        index = read_dataset(data, labels, kind=data_format, skip_bad=skip_bad)  # type: ignore[arg-type]
    except DatasetError as exc:
        console.print(f"[bold red]Data error[/]: {exc}")
        raise typer.Exit(2) from None
    return index


def _report_data(index, limit: int = 20) -> None:
    console.print(index.describe())
    for problem in index.problems[:limit]:
        console.print(f"[yellow]skipped[/] {problem}")
    if len(index.problems) > limit:
        console.print(f"[yellow]... and {len(index.problems) - limit} more skipped[/]")
    for path in index.unlabelled[:limit]:
        console.print(f"[yellow]no label row[/] {path} (not used)")
    if len(index.unlabelled) > limit:
        console.print(f"[yellow]... and {len(index.unlabelled) - limit} more images without a label row[/]")


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        console.print(f"[bold red]--split[/] takes three fractions train,val,test (e.g. 0.7,0.15,0.15), not {text!r}")
        raise typer.Exit(2)
    return values  # type: ignore[return-value]


@dataset_app.command("check")
def dataset_check(
    data: Path = DataOption,
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[str] = FormatOption,
    skip_bad: bool = SkipBadOption,
    decode: bool = typer.Option(False, help="also decode every image's pixel data (slow: the whole set is read)"),
) -> None:
    """Read a data set's labels and headers; report images, patients, positives and anything unusable."""
    index = _read_data(data, labels, data_format, skip_bad)
    _report_data(index)
    if not decode:
        return
    from rich.progress import Progress

    from contract.bundle import Preprocessing
    from training.cache import decode_example
    from contract.preprocess import ImageDecodeError

    failures = 0
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
                failures += 1
                row = f", row {example.rows[0]}" if example.rows else ""
                console.print(f"[bold red]cannot decode[/] {example.path}{row}: {exc}")
            bar.advance(task)
    if failures:
        console.print(
            f"[bold red]{failures} image(s) will not decode[/] (pleura train stops on them; --skip-bad leaves them out)"
        )
        raise typer.Exit(1)
    console.print(f"[green]all {len(index.examples)} images decode[/]")


@dataset_app.command("split")
def dataset_split(
    data: Path = DataOption,
    out: Path = typer.Option(..., "--out", "-o", help="split file to write (CSV)"),
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[str] = FormatOption,
    split: str = typer.Option("0.7,0.15,0.15", "--split", help="train,val,test fractions (of patients, per class)"),
    seed: int = typer.Option(0),
    skip_bad: bool = SkipBadOption,
) -> None:
    """Write a stratified, patient-level train/val/test split, for `pleura train --split-file`."""
    from training.splits import make_splits, split_counts, write_splits

    index = _read_data(data, labels, data_format, skip_bad)
    _report_data(index)
    assignment = make_splits(index.examples, _fractions(split), seed=seed)
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


def _feedback_source(config: Optional[Path], storage: Optional[Path]) -> tuple[Path, Optional[str]]:
    """The storage directory whose feedback to use and its ledger: the configured ones, or the
    SQLite ledger in the directory given."""
    if storage is not None:
        return storage, None
    settings = _settings(config)
    return settings.storage_dir, settings.ledger_url


def _export_feedback(storage: Path, ledger_url: Optional[str], out: Path, **options):
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
    deidentify: bool = typer.Option(False, help="de-identify the DICOM copies (pseudonymous patient IDs, new UIDs)"),
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
    source, ledger_url = _feedback_source(config, storage)
    _export_feedback(source, ledger_url, out, deidentify=deidentify, key_file=key_file, skip_bad=skip_bad)


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
        indexes.append(_read_data(data, labels, data_format, skip_bad))
        _report_data(indexes[-1])
    if from_feedback:
        exported = out / FEEDBACK_DATA_DIR
        if not (resume and exported.is_dir()):  # a resumed run keeps the data it started with
            source, ledger_url = _feedback_source(config, feedback_storage)
            _export_feedback(source, ledger_url, exported, skip_bad=skip_bad)
        indexes.append(_read_data(exported, None, "siim", skip_bad))
    index = merge_datasets(indexes)
    if len(indexes) > 1:
        _report_data(index)
    return index


@app.command()
def train(
    preset_names: list[str] = typer.Option(
        ..., "--preset", "-p",
        help="recipe name (see --list-presets); give a classifier and a U-Net preset to train both networks",
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", "-d",
        help="data set directory (SIIM-ACR or ChestX-ray14 layout, or a Pleura storage directory); with --from-feedback, trained on together",
    ),
    labels: Optional[Path] = LabelsOption,
    data_format: Optional[str] = FormatOption,
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
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (mixed precision on CUDA)"),
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
) -> None:
    """Train a preset's network and write a model bundle that `pleura worker` runs unchanged.

    With one preset the bundle's other network comes from --base. With a classifier and a U-Net
    preset both are trained on the same split, each in OUT/PRESET, and OUT/<second preset>/bundle
    holds both.
    """
    from contract.bundle import BundleError, load_bundle
    from training.datasets import DatasetError
    from training.presets import PresetError, get_preset, parse_override, with_overrides
    from training.trainer import CHECKPOINTS, SPLITS_FILE, TrainingError, train as run_training

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

        explicit_split = _fractions(split) if split != "0.7,0.15,0.15" else None  # else the preset's 64/16/20
        return train_ct_command(presets[0], data, out, split_file, explicit_split, device, name, version,
                                intended_use, skip_bad, console)
    if len(presets) > 2 or (len(presets) == 2 and {p.task for p in presets} != {"classify", "segment"}):
        console.print("[bold red]Preset error[/]: give one preset, or one classifier and one U-Net preset")
        raise typer.Exit(2)
    if data is None and not from_feedback:
        console.print("[bold red]No data[/]: give --data, --from-feedback, or both")
        raise typer.Exit(2)
    try:
        current_base = load_bundle(base or active_bundle_dir(_settings(config)))
    except BundleError as exc:
        console.print(f"[bold red]Base bundle error[/]: {exc}")
        raise typer.Exit(2) from None
    index = _training_data(data, labels, data_format, skip_bad, from_feedback, feedback_storage, out, resume, config)
    fractions = _fractions(split)
    current_split = split_file
    result = None
    for preset in presets:
        run_dir = out if len(presets) == 1 else out / preset.name
        other = "segmenter" if preset.task == "classify" else "classifier"
        source = f"{current_base.path} ({current_base.identity.label})"
        console.print(f"training the {preset.network_role} of {preset.name} in {run_dir}; the {other} comes from {source}")
        stage_resume = resume and (len(presets) == 1 or (run_dir / CHECKPOINTS / "last.pt").exists())
        try:
            result = run_training(
                preset, index, run_dir, base=current_base, split_file=current_split, fractions=fractions,
                device=device, resume=stage_resume, cache_root=cache_dir, skip_bad=skip_bad, name=name,
                version=version, intended_use=intended_use, console=console,
            )
        except (TrainingError, DatasetError, BundleError, ValueError) as exc:
            console.print(f"[bold red]Training error[/]: {exc}")
            raise typer.Exit(2) from None
        current_base = result.bundle
        current_split = current_split or run_dir / SPLITS_FILE
    assert result is not None
    console.print(json.dumps(result.bundle.manifest.metrics, indent=2))
    if register:
        from pleura.models_cli import import_into_registry

        import_into_registry(_settings(config), result.bundle.path)
    else:
        console.print(f"use it: pleura models import {result.bundle.path} (or PLEURA_MODEL_DIR={result.bundle.path})")


@app.command()
def worklist(
    config: Optional[Path] = ConfigOption,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the worklist API and page on their own (`pleura node` serves them too when
    PLEURA_API_USERS is set); notifications stay with `pleura node`."""
    settings = _settings(config)
    _logging(verbose, log_format=settings.log_format)
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


# `pleura models …` (pleura/models_cli.py) uses the helpers above; under `python -m pleura.cli` this
# file is __main__, so it is also registered under its own name for that import to find.
sys.modules.setdefault("pleura.cli", sys.modules[__name__])
from pleura.models_cli import models_app  # noqa: E402

app.add_typer(models_app, name="models")
# `pleura evaluate`, `tune`, `compare`: registered on `app` by importing their module (last, as it imports this one).
from pleura import cli_evaluate  # noqa: E402,F401
from pleura.ops_cli import register_ops_commands, start_worker_ops  # noqa: E402  (uses the helpers above)

register_ops_commands(app, _settings, _logging, ConfigOption, console)

if __name__ == "__main__":
    app()
