"""Bare forward pass of a radiograph bundle's two networks over precision, memory format, batch
size and (optionally) torch.compile; and one bare training step per `pleura train` preset. Part
of `benchmarks/gpu.sh`, which adds the full analysis, the CT series and the training loop.

    .venv/bin/python benchmarks/gpu_bench.py forward --network demo|recipe [--device cuda]
        [--batches 1,8,32] [--precisions fp32,fp16,bf16] [--compile]
    .venv/bin/python benchmarks/gpu_bench.py train-step [--device cuda] [--size N] [--batch 8]

Images/s of random input at each network's own input size (``--size`` replaces it for a tiny run);
the networks' weights do not change their speed. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from contract.networks import build_network, load_models, resolve_device  # noqa: E402
from train_throughput import bare_step_rate  # noqa: E402
from training.presets import PRESETS  # noqa: E402
from training.trainer import network_recipe, network_spec  # noqa: E402
from worker_throughput import benchmark_bundle, recipe_bundle  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def precision(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def forward_rate(network: torch.nn.Module, shape: tuple[int, int, int], batch: int, dtype: torch.dtype | None,
                 channels_last: bool, device: torch.device, seconds: float) -> float:
    """Images/s of ``network`` on random batches (a warm-up pass, then passes for ~``seconds``)."""
    inputs = torch.randn(batch, *shape, device=device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with precision(device, dtype):
        network(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        passes, started = 0, time.perf_counter()
        while passes < 1 or time.perf_counter() - started < seconds:
            network(inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            passes += 1
    return batch * passes / (time.perf_counter() - started)


def forward(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="pleura-gpu-bench-") as folder:
        if args.network == "recipe":
            bundle = recipe_bundle(Path(folder) / "bundle", args.classifier, args.segmenter)
        else:
            bundle = benchmark_bundle(None)
        models = load_models(bundle, str(device))
    manifest = models.manifest
    networks = [("classifier", models.classifier, manifest.classifier)]
    if models.segmenter is not None:
        networks.append(("segmenter", models.segmenter, manifest.segmenter))
    print(f"\n#### Bare forward pass: {bundle.identity.label} on {device_name(device)}\n")
    print("| network | input | precision | memory format | compiled | " +
          " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in args.batches) + " |")
    for name, network, spec in networks:
        recipe = manifest.network_preprocessing(spec)
        size = args.size or recipe.input_size
        shape = (recipe.channels, size, size)
        for compiled in ([False, True] if args.compile else [False]):
            for channels_last in (False, True):
                module = network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                runnable = torch.compile(module) if compiled else module
                for label in args.precisions:
                    cells = []
                    for batch in args.batches:
                        try:
                            rate = forward_rate(runnable, shape, batch, DTYPES[label], channels_last, device, args.seconds)
                            cells.append(f"{rate:.1f}")
                        except Exception as exc:  # a precision or compiler this device lacks: say so, go on
                            cells.append(f"n/a ({type(exc).__name__})")
                    print(f"| {name} ({spec.architecture}) | {size} px | {label} | "
                          f"{'channels-last' if channels_last else 'contiguous'} | {'yes' if compiled else 'no'} | "
                          + " | ".join(cells) + " |", flush=True)
    print("\nimages/s, random input, each cell a warm-up pass and then passes for "
          f"{args.seconds:.1f} s; autocast for fp16/bf16.")


def train_step(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    print(f"\n#### One bare training step per preset on {device_name(device)}\n")
    print("| preset | input | batch | images/s (forward, backward, Adam step) |")
    print("| --- | --- | --- | --- |")
    for name, preset in PRESETS.items():
        recipe = network_recipe(preset)
        size = args.size or recipe.input_size
        try:
            network = build_network(network_spec(preset, recipe, recipe, {}), recipe.model_copy(update={"input_size": size}))
            batch = min(args.batch, preset.batch_size)
            rate = bare_step_rate(network, batch, recipe.channels, size, args.steps, device)
            cell = f"{rate:.2f}"
        except Exception as exc:  # a preset this device cannot train: say so, go on
            batch, cell = args.batch, f"n/a ({type(exc).__name__}: {str(exc)[:60]})"
        print(f"| `{name}` | {size} px | {batch} | {cell} |", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fwd = commands.add_parser("forward")
    fwd.add_argument("--network", choices=("demo", "recipe"), default="demo")
    fwd.add_argument("--classifier", default="cls-densenet121")
    fwd.add_argument("--segmenter", default="seg-unet-resnet34-dicefocal")
    fwd.add_argument("--device", default="auto")
    fwd.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 8, 32])
    fwd.add_argument("--precisions", type=lambda v: v.split(","), default=["fp32", "fp16", "bf16"])
    fwd.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    fwd.add_argument("--size", type=int, default=None, help="input side instead of each network's own (tiny runs)")
    fwd.add_argument("--seconds", type=float, default=1.0, help="timed passes per cell, seconds")
    step = commands.add_parser("train-step")
    step.add_argument("--device", default="auto")
    step.add_argument("--size", type=int, default=None, help="input side instead of each preset's own (tiny runs)")
    step.add_argument("--batch", type=int, default=8, help="cap on the preset's batch size")
    step.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    forward(args) if args.command == "forward" else train_step(args)


if __name__ == "__main__":
    main()
