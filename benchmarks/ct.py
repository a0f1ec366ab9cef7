"""Seconds per CT series through the worker's whole CT path, and peak memory.

A phantom series (``--slices`` axial slices of ``--size`` px, 200 x 512 by default) is written to a
storage folder by a child process (so generating it does not count towards this process's peak
memory), then :meth:`worker.ct_analysis.SeriesAnalyser.analyse` runs on it as the CT worker does:
read every slice, order, HU, window, segment in batches, clean the 3D mask, measure, write the
multi-frame SEG and the SR. One short warm-up series comes first (lazy initialisation).

The reference, measured in the same run: the bare forward pass of the same network over the same
slices (already preprocessed, the same batch size, no I/O, no post-processing, no writing). The
ratio pipeline / bare says how much the rest of the path costs on top of the network.

``--network demo`` uses the CT demo bundle (a small U-Net, 128 px input); ``--network recipe``
a bundle with the ``ct-seg-unet-resnet50`` recipe's network at its own input (512 px; untrained
weights: the speed does not depend on them).

    .venv/bin/python benchmarks/ct.py [--slices 200] [--size 512] [--network demo|recipe]
        [--device cpu] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _generate(folder: Path, slices: int, size: int) -> None:
    """Child process: write the phantom's slices under ``folder``/instances like the node stores them."""
    from training.ct_synthetic import make_phantom, phantom_datasets

    phantom = make_phantom(5, slices=slices, size=size)
    for ds in phantom_datasets(phantom):
        path = folder / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    print(f"{phantom.mask_volume_ml:.3f}")


def _instances(storage: Path) -> tuple[str, str, list[dict[str, str]]]:
    paths = sorted((storage / "instances").glob("*/*/*.dcm"))
    study, series = paths[0].parent.parent.name, paths[0].parent.name
    return study, series, [{"sop_instance_uid": p.stem, "key": str(p.relative_to(storage))} for p in paths]


def _recipe_bundle(folder: Path) -> Path:
    import torch

    from contract.bundle import DEMO_INTENDED_USE, Manifest, NetworkSpec, Thresholds, write_manifest
    from training.presets import get_preset
    from training.trainer import network_recipe
    from contract.networks import build_network

    preset = get_preset("ct-seg-unet-resnet50")
    recipe = network_recipe(preset)
    spec = NetworkSpec(architecture="unet", encoder=preset.encoder, weights_file="segmenter.pt")
    torch.save(build_network(spec, recipe).state_dict(), folder / spec.weights_file)
    write_manifest(
        folder,
        Manifest(
            name="benchmark-ct-recipe", version="0", kind="ct", intended_use=DEMO_INTENDED_USE, synthetic_demo=True,
            preprocessing=recipe, segmenter=spec, thresholds=Thresholds(),
        ),
    )
    return folder


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--network", choices=("demo", "recipe"), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        _generate(args.generate, args.slices, args.size)
        return

    import numpy as np
    import torch

    from config.settings import default_storage_dir
    from contract.bundle import load_bundle
    from training.ct_demo_model import ensure_ct_demo_bundle
    from worker.ct_analysis import SeriesAnalyser
    from contract.ct_preprocess import ct_network_input, series_geometry, slice_hu

    with tempfile.TemporaryDirectory(prefix="pleura-ct-bench-") as tmp:
        work = Path(tmp)
        for name, slices in (("warmup", 8), ("series", args.slices)):
            out = subprocess.run(
                [sys.executable, __file__, "--generate", str(work / name), "--slices", str(slices),
                 "--size", str(args.size)],
                check=True, capture_output=True, text=True,
            )
        truth_ml = float(out.stdout.strip().splitlines()[-1])
        if args.network == "demo":
            bundle, _ = ensure_ct_demo_bundle(default_storage_dir() / "models" / "ct-demo", progress=False)
        else:
            (work / "bundle").mkdir()
            bundle = load_bundle(_recipe_bundle(work / "bundle"))
        load_avg = os.getloadavg()[0]
        analyser = SeriesAnalyser(work / "warmup", bundle, args.device, batch_size=args.batch_size)
        analyser.analyse(*_instances(work / "warmup"))
        rss_before = _rss_mb()
        if analyser.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        analyser = SeriesAnalyser(work / "series", bundle, args.device, batch_size=args.batch_size)
        study, series, instances = _instances(work / "series")
        started = time.perf_counter()
        summary = analyser.analyse(study, series, instances)
        pipeline_s = time.perf_counter() - started
        rss_peak = _rss_mb()
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if analyser.device.type == "cuda" else None

        # The reference: the bare forward pass over the same slices, preprocessed beforehand.
        import pydicom

        datasets = [pydicom.dcmread(analyser.store.path(item["key"])) for item in instances]
        geometry = series_geometry(datasets)
        hu = np.stack([slice_hu(datasets[i]) for i in geometry.order])
        recipe = bundle.manifest.network_preprocessing(bundle.manifest.segmenter)
        batches = [
            torch.from_numpy(ct_network_input(hu[start : start + args.batch_size], recipe))
            for start in range(0, len(hu), args.batch_size)
        ]
        del hu, datasets
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                analyser.network(batch.to(analyser.device))
            if analyser.device.type == "cuda":
                torch.cuda.synchronize()
        bare_s = time.perf_counter() - started

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {analyser.device}; load average at start {load_avg:.1f}")
    print(f"bundle: {bundle.identity.label}, input {recipe.input_size} px, batch {args.batch_size}")
    print(f"series: {args.slices} slices of {args.size} x {args.size}; truth {truth_ml:.1f} mL, "
          f"measured {summary['volume_ml']} mL ({summary['side']})")
    print(f"pipeline (read, HU, segment, clean, SEG + SR): {pipeline_s:.1f} s per series")
    print(f"bare forward pass, same network and slices:    {bare_s:.1f} s  (ratio {pipeline_s / bare_s:.2f})")
    print(f"peak RSS: {rss_peak:.0f} MB (after the warm-up, before the series: {rss_before:.0f} MB)"
          + (f"; peak GPU memory allocated: {gpu_peak:.0f} MB" if gpu_peak is not None else ""))


if __name__ == "__main__":
    main()
