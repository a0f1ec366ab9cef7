"""Worker throughput: images/s of the full analysis against the models' bare forward pass.

The full analysis is :meth:`worker.analysis.StudyAnalyser.analyse`, exactly as the Celery task runs
it: read the stored file, decode the pixel data, preprocess for each network, run the classifier
and the U-Net, map the mask back and measure it, build and write the SEG, GSPS, SC and SR. The
reference, measured in the same run on the same device with the same models: the bare forward pass
of both networks on ready-made input tensors at the same batch size. The ratio full / bare is the
share of the models' own speed that the worker achieves; the rest is overhead, broken down by stage
(each stage timed on its own over the same images with the same functions the analysis calls; the
stages add up to about the full analysis).

    .venv/bin/python benchmarks/worker_throughput.py [--images 16] [--size 2048] [--batch-size 8]
        [--positive-fraction 0.05] [--analysis-processes N] [--device auto] [--model-dir DIR] [--write]

``--positive-fraction``: the share of synthetic images drawn with a pneumothorax (a worker sees
mostly negative images; a positive one costs a SEG, a measured mask and an outline).
``--analysis-processes N`` (N > 0) measures the full analysis twice in the same run: in the worker's
own process (``analysis_processes`` = 0) and with a pool of N processes (worker/pool.py), and
prints both ratios and the speed-up between them.

``--write`` records the table in docs/benchmarks.md between the markers of the "Worker throughput"
section for the device type.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pydicom
import torch

from config.settings import Settings
from contract.active import active_bundle_dir
from contract.bundle import Bundle, load_bundle
from contract.preprocess import decode_radiograph, mask_to_source, network_inputs
from node.storage import InstanceStore
from training.demo_model import ensure_demo_bundle
from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser
from worker.image_jobs import write_result
from worker.inference.measure import measure_mask
from worker.inference.predict import pixel_spacing_mm, predict_images
from worker.inference.runtime import forward_context
from worker.pool import AnalysisPool
from worker.writers.gsps import build_gsps
from worker.writers.sc import build_sc
from worker.writers.seg import build_seg
from worker.writers.sr import AnalysedImage, build_sr

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
MARKERS = "<!-- worker-throughput-{}:begin -->", "<!-- worker-throughput-{}:end -->"


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Seconds per call of ``function`` (best of ``repeats``), with the device's queue drained."""
    best = float("inf")
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        function()
        synchronise(device)
        best = min(best, time.perf_counter() - start)
    return best


def positive_indices(count: int, fraction: float) -> set[int]:
    """Which of ``count`` images are drawn positive: ``fraction`` of them (at least one when the
    fraction is above 0), spread evenly through the study."""
    wanted = 0 if fraction <= 0 else min(count, max(1, round(count * fraction)))
    return {int(k * count / wanted) for k in range(wanted)}


def store_images(
    storage: Path, count: int, size: int, first_seed: int = 0, positive_fraction: float | None = None
) -> list[dict[str, str]]:
    """``count`` synthetic 16-bit radiographs of ``size`` px in one study, ``positive_fraction`` of
    them positive (None: those of even seed; another ``first_seed``, another study)."""
    store = InstanceStore(storage)
    study_uid = None
    instances = []
    positive = None if positive_fraction is None else positive_indices(count, positive_fraction)
    for seed in range(first_seed, first_seed + count):
        drawn_positive = seed % 2 == 0 if positive is None else seed - first_seed in positive
        ds, _ = synthetic_dicom(seed, positive=drawn_positive, size=size)
        study_uid = study_uid or str(ds.StudyInstanceUID)
        ds.StudyInstanceUID = study_uid
        path = storage / "incoming.dcm"
        ds.save_as(path, enforce_file_format=True)
        key = store.write_instance(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), path.read_bytes())
        instances.append({"sop_instance_uid": str(ds.SOPInstanceUID), "key": key, "study_uid": study_uid})
    path.unlink()
    return instances


def benchmark_bundle(model_dir: Path | None) -> Bundle:
    """The bundle of ``--model-dir``, else the demo bundle (built when missing)."""
    bundle_dir = model_dir or active_bundle_dir(Settings())
    if model_dir is None:
        ensure_demo_bundle(bundle_dir, progress=False)
    return load_bundle(bundle_dir)


def recipe_bundle(folder: Path, classifier: str, segmenter: str) -> Bundle:
    """A bundle of two presets' networks at their own input sizes, with untrained weights (the
    speed of a full-size model; its decisions mean nothing)."""
    from contract.bundle import DEMO_INTENDED_USE, Manifest, Thresholds, write_manifest
    from training.presets import get_preset
    from training.trainer import network_recipe, network_spec
    from contract.networks import build_network

    torch.manual_seed(0)  # the same untrained networks in every run, so runs compare
    presets = get_preset(classifier), get_preset(segmenter)
    shared = network_recipe(presets[0])
    specs = [network_spec(preset, network_recipe(preset), shared, {}) for preset in presets]
    folder.mkdir(parents=True, exist_ok=True)
    for preset, spec in zip(presets, specs):
        torch.save(build_network(spec, network_recipe(preset)).state_dict(), folder / spec.weights_file)
    write_manifest(
        folder,
        Manifest(
            name=f"benchmark-{classifier}-{segmenter}", version="untrained", intended_use=DEMO_INTENDED_USE,
            synthetic_demo=True, preprocessing=shared, classifier=specs[0], segmenter=specs[1], thresholds=Thresholds(),
        ),
    )
    return load_bundle(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=2048, help="side of the synthetic radiographs, pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "auto"),
                        help="inference_backend of the full analysis (CPU); the reference stays torch")
    parser.add_argument("--model-dir", type=Path, default=None, help="bundle (default: the demo bundle)")
    parser.add_argument("--network", choices=("demo", "recipe"), default="demo",
                        help="recipe: untrained full-size networks of --classifier and --segmenter instead of the demo's")
    parser.add_argument("--classifier", default="cls-densenet121", help="classifier preset for --network recipe")
    parser.add_argument("--segmenter", default="seg-unet-resnet34-dicefocal", help="segmenter preset for --network recipe")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="inference_precision of the full analysis (CUDA only: mixed precision, channels-last)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA only)")
    parser.add_argument("--positive-fraction", type=float, default=0.05,
                        help="share of the images drawn with a pneumothorax (at least one when above 0)")
    parser.add_argument("--analysis-processes", type=int, default=0,
                        help="N > 0: the full analysis also with a process pool of N (analysis_processes)")
    parser.add_argument("--write", action="store_true", help="record the result in docs/benchmarks.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pleura-bench-") as folder:
        storage = Path(folder)
        if args.network == "recipe":
            bundle = recipe_bundle(storage / "bundle", args.classifier, args.segmenter)
        else:
            bundle = benchmark_bundle(args.model_dir)
        instances = store_images(storage, args.images, args.size, positive_fraction=args.positive_fraction)
        study_uid = instances[0]["study_uid"]
        analyser = StudyAnalyser(storage, bundle, args.device, batch_size=args.batch_size, backend=args.backend,
                                 precision=args.precision, compile_networks=args.compile)
        models, device = analyser.models, analyser.models.device
        recipe = bundle.manifest.preprocessing

        # Warm up both paths once (allocator, kernels, lazy imports).
        analyser.analyse(study_uid, instances[: args.batch_size])

        full = timed(lambda: analyser.analyse(study_uid, instances), device)
        pooled = None
        if args.analysis_processes > 0:
            pool = AnalysisPool(args.analysis_processes)
            try:
                in_pool = StudyAnalyser(storage, bundle, args.device, batch_size=args.batch_size, backend=args.backend,
                                        precision=args.precision, compile_networks=args.compile, pool=pool)
                in_pool.warm()  # the pool's processes started, as the worker's warm-up does
                in_pool.analyse(study_uid, instances[: args.batch_size])
                pooled = timed(lambda: in_pool.analyse(study_uid, instances), device)
            finally:
                pool.shutdown()

        paths = [analyser.store.path(item["key"]) for item in instances]
        datasets = [pydicom.dcmread(path) for path in paths]
        images = [decode_radiograph(ds, recipe) for ds in datasets]
        classifier_input = torch.from_numpy(network_inputs(images, recipe, models.classifier_preprocessing)).to(device)
        segmenter_input = torch.from_numpy(network_inputs(images, recipe, models.segmenter_preprocessing)).to(device)

        def bare() -> None:
            with forward_context(models):  # the analysis's precision (autocast on CUDA), inference mode
                for start in range(0, len(images), args.batch_size):
                    models.classifier(classifier_input[start : start + args.batch_size])
                    models.segmenter(segmenter_input[start : start + args.batch_size])

        bare()
        forward = timed(bare, device, repeats=2)
        onnx_forward = None
        if analyser.networks is not None:  # the same bare pass through the chosen backends
            onnx_classifier, onnx_segmenter = analyser.networks

            def bare_onnx() -> None:
                for start in range(0, len(images), args.batch_size):
                    onnx_classifier(classifier_input[start : start + args.batch_size])
                    onnx_segmenter(segmenter_input[start : start + args.batch_size])

            bare_onnx()
            onnx_forward = timed(bare_onnx, device, repeats=2)

        findings = predict_images(models, images, datasets, batch_size=args.batch_size)
        identity = bundle.identity
        built: list[tuple] = []  # each image's (SEG or None, GSPS, SC), then the SR
        (storage / "results").mkdir(exist_ok=True)
        stages = {
            "read (dcmread)": timed(lambda: [pydicom.dcmread(path) for path in paths], device),
            "decode + VOI": timed(lambda: [decode_radiograph(ds, recipe) for ds in datasets], device),
            "preprocess (both grids)": timed(
                lambda: (network_inputs(images, recipe, models.classifier_preprocessing),
                         network_inputs(images, recipe, models.segmenter_preprocessing)),
                device,
            ),
            "forward (both networks)": forward,
            "mask to source + measure": timed(
                lambda: [
                    measure_mask(mask_to_source(finding.mask.astype("float32"), image.shape) >= 0.5, image, ds,
                                 pixel_spacing_mm(ds))
                    for finding, image, ds in zip(findings, images, datasets)
                ],
                device,
            ),
            "SEG + GSPS + SC": timed(
                lambda: built.extend(
                    (build_seg(ds, finding, identity) if finding.flagged else None,
                     build_gsps(ds, finding, identity), build_sc(ds, image, finding, identity, None))
                    for finding, image, ds in zip(findings, images, datasets)
                ),
                device,
            ),
            "SR (one for the study)": timed(
                lambda: built.append((build_sr(
                    [AnalysedImage(ds, finding, objects[0]) for ds, finding, objects in zip(datasets, findings, built)],
                    [], identity,
                ),)),
                device,
            ),
            "writing (durable)": timed(
                lambda: [
                    write_result(obj, storage / "results" / f"{index}-{kind}.dcm")
                    for index, objects in enumerate(built) for kind, obj in enumerate(objects) if obj is not None
                ],
                device,
            ),
        }

    count = args.images
    row = {
        "full": count / full,
        "bare": count / forward,
    }
    if onnx_forward is not None:
        row["onnx"] = count / onnx_forward
    if pooled is not None:
        row["pool"] = count / pooled
    threads = torch.get_num_threads()
    where = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {threads} threads")
    print(f"device: {where}; bundle: {identity.label}; {count} images of {args.size} px, batch {args.batch_size}, "
          f"precision {args.precision}{', compiled' if args.compile else ''}, backend {args.backend} (classifier {analyser.backends[0]}, segmenter {analyser.backends[1]})")
    positives = len(positive_indices(count, args.positive_fraction))
    print(f"{positives} of {count} images drawn positive (--positive-fraction {args.positive_fraction:g})")
    print(f"full analysis: {row['full']:.2f} images/s (analysis_processes 0); bare forward pass: "
          f"{row['bare']:.2f} images/s; ratio {row['full'] / row['bare']:.2f}")
    if "pool" in row:
        print(f"full analysis with a pool of {args.analysis_processes}: {row['pool']:.2f} images/s; "
              f"ratio {row['pool'] / row['bare']:.2f}; {row['pool'] / row['full']:.2f} times analysis_processes 0")
    if onnx_forward is not None:
        print(f"bare forward pass on {analyser.backends[0]} / {analyser.backends[1]}: {count / onnx_forward:.2f} "
              f"images/s; ratio to torch's {forward / onnx_forward:.2f}")
    total = sum(stages.values())
    for name, seconds in stages.items():
        print(f"  {name:<28} {1000 * seconds / count:8.1f} ms/image  {100 * seconds / total:5.1f} %")
    if args.write:
        record(row, stages, args, device, where, identity.label, analyser.backends)


def record(row: dict[str, float], stages: dict[str, float], args: argparse.Namespace, device: torch.device,
           where: str, label: str, backends: tuple[str, str]) -> None:
    key = device.type + ("-recipe" if args.network == "recipe" else "") + (
        f"-{args.backend}" if args.backend != "torch" else ""
    )
    begin, end = (marker.format(key) for marker in MARKERS)
    options = f" --network recipe --classifier {args.classifier} --segmenter {args.segmenter}" if args.network == "recipe" else ""
    options += f" --backend {args.backend}" if args.backend != "torch" else ""
    options += f" --positive-fraction {args.positive_fraction:g}"
    options += f" --analysis-processes {args.analysis_processes}" if args.analysis_processes else ""
    load = os.getloadavg()[0]
    lines = [
        begin,
        f"Measured {date.today().isoformat()} on {where} ({platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, with `benchmarks/worker_throughput.py --images {args.images} --size {args.size} "
        f"--batch-size {args.batch_size} --device {args.device}{options}`, bundle {label}. "
        f"Load average when it ended: {load:.1f}.",
        "",
        "| measure | images/s |",
        "| --- | --- |",
        f"| full analysis (`StudyAnalyser.analyse`) | {row['full']:.2f} |",
        f"| bare forward pass of both networks (reference) | {row['bare']:.2f} |",
        f"| ratio full / bare | {row['full'] / row['bare']:.2f} |",
        *(
            [f"| full analysis with a pool of {args.analysis_processes} (`analysis_processes`) | {row['pool']:.2f} |",
             f"| ratio of that / bare | {row['pool'] / row['bare']:.2f} |"]
            if "pool" in row else []
        ),
        *(
            [f"| bare forward pass on the full analysis's backends (classifier {backends[0]}, segmenter "
             f"{backends[1]}) | {row['onnx']:.2f} |",
             f"| ratio of that to torch's bare forward pass | {row['onnx'] / row['bare']:.2f} |"]
            if "onnx" in row else []
        ),
        "",
        "| stage | ms per image | share |",
        "| --- | --- | --- |",
    ]
    total = sum(stages.values())
    for name, seconds in stages.items():
        lines.append(f"| {name} | {1000 * seconds / args.images:.1f} | {100 * seconds / total:.0f} % |")
    lines.append(end)
    text = DOC.read_text()
    block = "\n".join(lines)
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## Worker throughput (`benchmarks/worker_throughput.py`, {key})\n\n{block}\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
