"""Training throughput (images/s) of every `pleura train` preset, through the real training loop.

For each preset: a short run of `training.trainer.train` (two epochs of a few batches, augmentation
on, the preset's own input size and network) on a synthetic SIIM-ACR set, reading the images/s that
the loop itself logs to metrics.csv for the second epoch (the first one warms up): forward, backward,
optimiser step, augmentation and batch assembly from the cache; caching and validation excluded.
The reference, measured in the same run: the bare training step of the same network (forward,
backward, Adam step on a random batch of the same shape, no data pipeline); the ratio loop / bare
is the share of the network's own speed the loop achieves. Results go into docs/benchmarks.md
between the markers of the "Training throughput" section.

    .venv/bin/python benchmarks/train_throughput.py [--device cpu] [--steps 3] [--batch-size 8]
        [--presets cls-resnet18,seg-unet-resnet50] [--write]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from contract.bundle import DEMO_INTENDED_USE, Manifest, NetworkSpec, Preprocessing, write_manifest, load_bundle
from contract.networks import build_network, resolve_device
from training.datasets import read_siim
from training.presets import PRESETS, with_overrides
from training.synthetic import write_siim_dataset
from training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
MARKERS = "<!-- train-throughput-{}:begin -->", "<!-- train-throughput-{}:end -->"  # one block per device type


def _base(root: Path) -> Path:
    """A stand-in base bundle (tiny random networks) to complete each trained bundle."""
    manifest = Manifest(
        name="bench-base",
        version="0",
        intended_use=DEMO_INTENDED_USE,
        synthetic_demo=True,
        preprocessing=Preprocessing(input_size=64),
        classifier=NetworkSpec(
            architecture="densenet121",
            weights_file="classifier.pt",
            extra={"init_features": 8, "growth_rate": 4, "block_config": [2, 2]},
        ),
        segmenter=NetworkSpec(
            architecture="unet",
            encoder="resnet18",
            weights_file="segmenter.pt",
            extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
        ),
    )
    root.mkdir(parents=True, exist_ok=True)
    for spec in (manifest.classifier, manifest.segmenter):
        torch.save(build_network(spec, manifest.preprocessing).state_dict(), root / spec.weights_file)
    write_manifest(root, manifest)
    return root


def bare_step_rate(network: torch.nn.Module, batch: int, channels: int, size: int, steps: int,
                   device: torch.device) -> float:
    """Images/s of forward + backward + Adam step alone, on a random batch (one warm-up step)."""
    network = network.to(device).train()
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-4)
    inputs = torch.randn(batch, channels, size, size, device=device)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        output = network(inputs)
        output = output[0] if isinstance(output, (tuple, list)) else output
        output.float().mean().backward()
        optimiser.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="batches per preset")
    parser.add_argument("--batch-size", type=int, default=8, help="cap on the preset's batch size")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=512, help="side of the synthetic DICOM images")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--write", action="store_true", help="record the table in docs/benchmarks.md")
    args = parser.parse_args()
    args.load = os.getloadavg()[0]
    device = resolve_device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pleura-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        data = read_siim(write_siim_dataset(work / "data", args.images, size=args.image_size, seed=0))
        print(f"generated {args.images} synthetic images in {time.perf_counter() - started:.0f} s", flush=True)
        base = load_bundle(_base(work / "base"))
        for name in args.presets.split(","):
            preset = PRESETS[name]
            batch = min(preset.batch_size, args.batch_size)
            short = with_overrides(
                preset,
                {
                    "epochs": 2,  # the first epoch warms up (lazy initialisation); the second is measured
                    "steps_per_epoch": args.steps,
                    "batch_size": batch,
                    "positives_only": False,
                    "patience": 0,
                },
            )
            run = work / "runs" / name
            train(
                short,
                data,
                run,
                base=base,
                cache_root=work / "cache",
                device=str(device),
                progress=False,
                fractions=(0.8, 0.2, 0.0),
            )
            with (run / "metrics.csv").open(newline="") as handle:
                metrics = list(csv.DictReader(handle))[-1]
            rate = float(metrics["images_per_second"])
            bundle = load_bundle(run / "bundle")
            spec = bundle.manifest.segmenter if name.startswith("seg-") else bundle.manifest.classifier
            recipe = bundle.manifest.network_preprocessing(spec)
            bare = bare_step_rate(build_network(spec, recipe), batch, recipe.channels, recipe.input_size, args.steps, device)
            rows.append((name, preset.input_size, batch, rate, bare))
            print(f"{name:32s} {preset.input_size:5d} px  batch {batch:3d}  {rate:8.2f} images/s  "
                  f"bare step {bare:8.2f}  ratio {rate / bare:5.2f}", flush=True)
    if args.write:
        _record(rows, args, device)


def _record(rows, args, device: torch.device) -> None:
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (mixed precision)"
    else:
        where = f"CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    begin, end = (marker.format(device.type) for marker in MARKERS)
    lines = [
        begin,
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {where}, torch {torch.__version__}, with "
        f"`benchmarks/train_throughput.py --device {args.device} --steps {args.steps} --batch-size {args.batch_size}`: "
        f"two epochs of {args.steps} training batches per preset, the second one timed, at the preset's input "
        "size, batch size capped at "
        f"{args.batch_size}, augmentation on, synthetic {args.image_size} px DICOM images through the cache. "
        f"Load average when it started: {args.load:.1f} (other jobs share the machine: compare with care).",
        "",
        "| preset | input | batch | images/s (training loop) | images/s (bare step, reference) | ratio |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| `{name}` | {size} px | {batch} | {rate:.2f} | {bare:.2f} | {rate / bare:.2f} |"
          for name, size, batch, rate, bare in rows],
        end,
    ]
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = "\n".join(lines)
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        heading = f"## Training throughput (`pleura train`, {'GPU' if device.type == 'cuda' else 'CPU'})"
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"recorded in {DOC}")


if __name__ == "__main__":
    main()
