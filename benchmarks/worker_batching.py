"""Dynamic batching: images/s with N studies in flight at once against the same studies one at a time.

Both runs use one :class:`worker.analysis.StudyAnalyser` as a `pleura worker` does: the reference
analyses the studies one after another (the solo pool, ``worker_threads = 1``); the measured run
analyses them from N threads at once (the threads pool, ``worker_threads = N``), whose images share
forward passes through the analyser's batcher. Printed: images/s of each, their ratio, and the
forward passes each took. Nothing is written to docs/benchmarks.md: run it on a quiet machine and
record the figures by hand.

    .venv/bin/python benchmarks/worker_batching.py [--studies 8] [--images-per-study 1] [--size 1024]
        [--threads 4] [--batch-size 8] [--wait-ms 5] [--device auto] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from worker.analysis import StudyAnalyser
from worker_throughput import benchmark_bundle, store_images, synchronise  # benchmarks/ is on the path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--images-per-study", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024, help="side of the synthetic radiographs, pixels")
    parser.add_argument("--threads", type=int, default=4, help="studies in flight at once (worker_threads)")
    parser.add_argument("--batch-size", type=int, default=8, help="most images per forward pass")
    parser.add_argument("--wait-ms", type=float, default=5.0, help="batch_wait_ms")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model-dir", type=Path, default=None, help="bundle (default: the demo bundle)")
    args = parser.parse_args()

    bundle = benchmark_bundle(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="pleura-bench-") as folder:
        storage = Path(folder)
        studies = []
        for index in range(args.studies):
            instances = store_images(storage, args.images_per_study, args.size, first_seed=index * args.images_per_study)
            studies.append((instances[0]["study_uid"], instances))
        analyser = StudyAnalyser(storage, bundle, args.device, batch_size=args.batch_size, batch_wait_s=args.wait_ms / 1000)
        device = analyser.models.device
        analyser.analyse(*studies[0])  # warm up

        def one_at_a_time() -> None:
            for uid, instances in studies:
                analyser.analyse(uid, instances)

        def in_flight_together() -> None:
            with ThreadPoolExecutor(args.threads) as pool:
                list(pool.map(lambda study: analyser.analyse(*study), studies))

        timings = {}
        for name, run in (("one at a time", one_at_a_time), (f"{args.threads} in flight", in_flight_together)):
            passes = analyser.batcher.forward_passes
            synchronise(device)
            start = time.perf_counter()
            run()
            synchronise(device)
            timings[name] = (time.perf_counter() - start, analyser.batcher.forward_passes - passes)

    images = args.studies * args.images_per_study
    where = device.type + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
    print(f"device: {where}; bundle: {bundle.identity.label}; {args.studies} studies x {args.images_per_study} "
          f"images of {args.size} px; batch {args.batch_size}, wait {args.wait_ms} ms")
    for name, (seconds, passes) in timings.items():
        print(f"  {name:<16} {images / seconds:8.2f} images/s  ({passes} forward passes)")
    (reference, _), (batched, _) = timings.values()
    print(f"ratio in flight / one at a time: {reference / batched:.2f}")


if __name__ == "__main__":
    main()
