"""The worker's speed work, in process: thread counts, dynamic batching, reading each file once,
and the CUDA-only settings leaving the CPU path as it is. (No timing is asserted: see benchmarks/.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

import worker.analysis
from node.ledger import Ledger
from services import (
    find_tool, free_port, http_get, metric_sample, pleura_process, port_open, wait_for, write_config,
)
from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser
from worker.inference.batcher import ForwardBatcher
from worker.inference.predict import network_outputs
from worker.inference.runtime import accelerate, forward_context, thread_counts, to_device


def test_thread_counts_share_the_cpus_between_processes_unless_set():
    assert thread_counts(16, 1) == (16, 2)
    assert thread_counts(16, 4) == (4, 1)
    assert thread_counts(2, 4) == (1, 1)  # never zero
    assert thread_counts(16, 4, setting=3) == (3, 1)


def _echo_forward(calls: list[int]):
    """A stand-in network: probability = the image's first pixel, mask = the image itself."""

    def forward(images):
        calls.append(len(images))
        return np.array([float(image[0, 0]) for image in images]), np.stack(images)

    return forward


def test_the_batcher_gives_each_caller_its_own_rows_from_shared_passes():
    from node.ops.worker_metrics import FORWARD_IMAGES, FORWARD_PASSES

    calls: list[int] = []
    batcher = ForwardBatcher(_echo_forward(calls), max_images=8, max_wait_s=0.2)
    passes_before, images_before = FORWARD_PASSES._value.get(), FORWARD_IMAGES._value.get()
    start = threading.Barrier(4)

    def caller(index: int):
        images = [np.full((2, 2), 10 * index + k, dtype=np.float32) for k in range(2)]
        start.wait()
        return index, batcher.run(images)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(caller, range(4)))
    for index, (probabilities, masks) in results:
        assert probabilities.tolist() == [10 * index, 10 * index + 1]
        assert masks[:, 0, 0].tolist() == [10 * index, 10 * index + 1]
    assert sum(calls) == 8 and len(calls) < 4, calls  # fewer passes than callers
    assert max(calls) <= 8 and batcher.forward_passes == len(calls)
    assert FORWARD_PASSES._value.get() - passes_before == len(calls)  # /metrics of the worker
    assert FORWARD_IMAGES._value.get() - images_before == 8


def test_the_batcher_respects_its_maximum_and_passes_errors_to_every_caller():
    calls: list[int] = []
    batcher = ForwardBatcher(_echo_forward(calls), max_images=3, max_wait_s=0.05)
    with ThreadPoolExecutor(3) as pool:
        outputs = list(pool.map(lambda i: batcher.run([np.full((1, 1), i, dtype=np.float32)] * 2), range(3)))
    assert [o[0].tolist() for o in outputs] == [[0, 0], [1, 1], [2, 2]]
    assert max(calls) <= 3

    def broken(images):
        raise RuntimeError("CUDA out of memory")

    failing = ForwardBatcher(broken, max_images=4, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="out of memory"):
        failing.run([np.zeros((1, 1), dtype=np.float32)])
    with pytest.raises(ValueError, match="no images"):
        failing.run([])


@pytest.fixture(scope="module")
def analyser(tmp_path_factory, demo_bundle):
    return StudyAnalyser.from_bundle_dir(tmp_path_factory.mktemp("storage"), demo_bundle, device="cpu",
                                         batch_wait_s=0.2)


def _study(analyser: StudyAnalyser, seed: int, count: int) -> tuple[str, list[dict[str, str]]]:
    study_uid, items = None, []
    for offset in range(count):
        ds, _ = synthetic_dicom(seed=seed + offset, positive=offset % 2 == 0, size=256)
        study_uid = study_uid or str(ds.StudyInstanceUID)
        ds.StudyInstanceUID = study_uid
        key = f"instances/{study_uid}/{ds.SOPInstanceUID}.dcm"
        path = analyser.storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        items.append({"sop_instance_uid": str(ds.SOPInstanceUID), "key": key})
    return study_uid, items


def _timeless(path) -> pydicom.Dataset:
    """A written object without its creation dates and times and highdicom's random Dimension
    Organization UID of a SEG, its single numbers to 6 decimals (all else must match)."""
    dataset = pydicom.dcmread(path)

    def strip(ds: pydicom.Dataset) -> None:
        for element in list(ds):
            if element.VR in ("DA", "TM", "DT") or element.keyword == "DimensionOrganizationUID":
                del ds[element.tag]
            elif element.VR in ("FD", "FL", "DS") and element.VM == 1 and element.value not in (None, ""):
                # The same image in a batch of another size: the last float bits may differ.
                ds[element.tag] = pydicom.DataElement(element.tag, "FD", round(float(element.value), 6))
            elif element.VR == "SQ":
                for item in element.value:
                    strip(item)

    strip(dataset)
    return dataset


def _comparable(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "analysed_at"}


def test_studies_analysed_at_once_share_forward_passes_and_give_the_same_results(analyser, monkeypatch):
    studies = [_study(analyser, seed, 2) for seed in (300, 310, 320)]
    alone = [analyser.analyse(uid, items) for uid, items in studies]
    written = {r["key"]: _timeless(analyser.storage_dir / r["key"]) for s in alone for r in s["results"]}

    reads: list[str] = []
    original = pydicom.dcmread
    monkeypatch.setattr(worker.analysis.pydicom, "dcmread", lambda path, **kw: reads.append(str(path)) or original(path, **kw))
    before = analyser.batcher.forward_passes
    start = threading.Barrier(len(studies))

    def analyse(study):
        start.wait()
        return analyser.analyse(*study)

    with ThreadPoolExecutor(len(studies)) as pool:
        together = list(pool.map(analyse, studies))
    passes = analyser.batcher.forward_passes - before
    assert passes < len(studies), f"{passes} forward passes for {len(studies)} studies analysed at once"
    assert [_comparable(s) for s in together] == [_comparable(s) for s in alone]
    for summary in together:  # the same objects (deterministic UIDs, same content), but for the time made
        for result in summary["results"]:
            assert _timeless(analyser.storage_dir / result["key"]) == written[result["key"]], result["kind"]
    # Each stored instance was read once (header and pixel data from one parse).
    assert sorted(r for r in reads if "/instances/" in r) == sorted(str(analyser.store.path(i["key"])) for _, items in studies for i in items)


def test_the_cuda_settings_leave_the_cpu_path_as_it_is(analyser):
    models = analyser.models
    assert accelerate(models, "fp16", compile_networks=True) is models
    assert models.autocast_dtype is None and models.compiled is None
    assert next(models.classifier.parameters()).is_contiguous()  # not channels-last
    batch = torch.zeros(2, 1, 8, 8)
    moved = to_device(batch, torch.device("cpu"))
    assert moved.data_ptr() == batch.data_ptr() and not moved.is_pinned()
    with forward_context(models):
        assert torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cuda")
    with pytest.raises(ValueError, match="precision"):
        accelerate(type(models)(models.classifier, models.segmenter, models.manifest, torch.device("cuda")), "fp8")
    image = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    probabilities, masks = network_outputs(models, [image])
    assert probabilities.dtype == np.float32 and masks.shape[0] == 1


def test_a_real_worker_batches_studies_sent_together_and_writes_what_one_at_a_time_writes(tmp_path, demo_bundle):
    """`pleura node` + `pleura worker` (threads pool, embedded broker); storescu sends four
    one-image studies in one association. The worker's log counts its forward passes; each
    study's results equal those of the same study analysed alone, in process."""
    port, metrics_port, storage = free_port(), free_port(), tmp_path / "storage"
    config = write_config(
        tmp_path / "pleura.toml", ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=storage,
        device="cpu", settle_seconds=1.0, model_bundle_dir=demo_bundle, worker_threads=4, inference_batch_size=4,
        batch_wait_ms=5000, metrics_port=free_port(), worker_metrics_port=metrics_port, torch_threads=1,
    )
    files = []
    for seed in range(4):
        dataset, _ = synthetic_dicom(seed=500 + seed, positive=seed % 2 == 0, size=256)
        files.append(tmp_path / f"study-{seed}.dcm")
        dataset.save_as(files[-1], enforce_file_format=True)
    studies = [str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) for path in files]
    storage.mkdir()
    node = pleura_process("node", config, tmp_path / "node.log")
    worker = pleura_process("worker", config, tmp_path / "worker.log")
    ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
    try:
        wait_for(lambda: port_open(port) or not node.alive(), 60, "pleura node to listen")
        assert node.alive(), node.output()
        logs = lambda: f"--- node ---\n{node.output()[-5000:]}\n--- worker ---\n{worker.output()[-5000:]}"  # noqa: E731
        sent = subprocess.run([find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(port),
                               *map(str, files)], capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr

        def analysed() -> bool:
            assert worker.alive() and node.alive(), logs()
            statuses = [(ledger.study_status(uid) or {}).get("status") for uid in studies]
            assert not {"failed", "not_analysed"} & set(statuses), (statuses, logs())
            return all(status in ("done", "delivered") for status in statuses)

        wait_for(analysed, 300, "the four studies analysed", interval=0.5)
        passes = [int(m) for m in re.findall(r"forward pass: (\d+) images", worker.output())]
        assert sum(passes) == 4 and len(passes) < 4, (passes, logs())
        assert "torch threads: 1 intra-op" in worker.output(), logs()  # PLEURA_TORCH_THREADS applied
        _, metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert metric_sample(metrics, "pleura_worker_forward_passes_total") == len(passes)
        assert metric_sample(metrics, "pleura_worker_forward_images_total") == 4
    finally:
        worker.stop()
        node.stop()

    # The same networks as the worker's: its inference backend (auto: the choice recorded for this
    # host beside the shared ONNX export) and its one torch thread. Results are the same bit for bit
    # only on the same backend; the batching must not change them.
    alone = StudyAnalyser.from_bundle_dir(
        tmp_path / "alone", demo_bundle, device="cpu", backend="auto", onnx_cache=Path(os.environ["PLEURA_ONNX_CACHE_DIR"])
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_with_alone(alone, ledger, storage, studies)
    finally:
        torch.set_num_threads(threads)


def _compare_with_alone(alone: StudyAnalyser, ledger: Ledger, storage: Path, studies: list[str]) -> None:
    for uid in studies:
        instances = ledger.list_instances(uid)
        for instance in instances:
            target = alone.store.path(instance.storage_key)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(storage / instance.storage_key, target)
        summary = alone.analyse(uid, [{"sop_instance_uid": i.sop_instance_uid, "key": i.storage_key} for i in instances])
        recorded = sorted(result.storage_key for result in ledger.list_results(uid))
        assert recorded == sorted(result["key"] for result in summary["results"])
        for key in recorded:
            assert _timeless(storage / key) == _timeless(alone.store.path(key)), key


def test_on_cuda_the_next_batch_is_decoded_while_this_one_runs(analyser, monkeypatch):
    """The prefetching order (CUDA only) yields what decoding one batch after the other yields."""
    _, items = _study(analyser, 400, 5)
    candidates = [(i["sop_instance_uid"], pydicom.dcmread(analyser.store.path(i["key"]))) for i in items]
    candidates[2][1].PhotometricInterpretation = "RGB"  # one image that cannot be decoded
    monkeypatch.setattr(analyser, "batch_size", 2)
    sequential = list(analyser._decoded_batches(candidates))
    threads: set[str] = set()
    decode = analyser._decode
    monkeypatch.setattr(
        analyser, "_decode", lambda chunk, times=None: threads.add(threading.current_thread().name) or decode(chunk, times)
    )
    monkeypatch.setattr(analyser.models, "device", torch.device("cuda"))
    prefetched = list(analyser._decoded_batches(candidates))
    assert len(prefetched) == len(sequential) == 3
    for (batch, unreadable), (expected, expected_unreadable) in zip(prefetched, sequential):
        assert [uid for uid, _, _ in batch] == [uid for uid, _, _ in expected]
        assert all(np.array_equal(a, b) for (_, _, a), (_, _, b) in zip(batch, expected))
        assert unreadable == expected_unreadable
    assert sum(len(u) for _, u in prefetched) == 1
    assert all(name.startswith("pleura-decode") for name in threads)


def test_onnxruntime_gives_the_decisions_and_probabilities_of_torch(tmp_path, analyser, demo_bundle):
    """The ONNX Runtime path: exported once into the storage's cache (keyed by the weights), then
    the same flags and, within float tolerance, the same probabilities and masks as torch."""
    from worker.inference.onnx_backend import OnnxNetwork

    onnx = StudyAnalyser.from_bundle_dir(analyser.storage_dir, demo_bundle, device="cpu", backend="onnxruntime")
    assert all(isinstance(network, OnnxNetwork) for network in onnx.networks)
    exported = sorted((analyser.storage_dir / "onnx-cache").glob("*/*.onnx"))
    assert len(exported) == 2
    stamps = [path.stat().st_mtime_ns for path in exported]
    again = StudyAnalyser.from_bundle_dir(analyser.storage_dir, demo_bundle, device="cpu", backend="onnxruntime")
    assert [path.stat().st_mtime_ns for path in exported] == stamps  # not exported again
    assert sorted(str(network.path) for network in again.networks) == [str(path) for path in exported]

    rng = np.random.default_rng(5)
    images = [rng.random((200, 180), dtype=np.float32) for _ in range(3)]
    images += _decoded(analyser, 600, 3)
    torch_p, torch_masks = network_outputs(analyser.models, images)
    onnx_p, onnx_masks = network_outputs(onnx.models, images, onnx.networks)
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-4)
    np.testing.assert_allclose(onnx_masks, torch_masks, atol=1e-4)

    uid, items = _study(analyser, 610, 4)
    by_torch, by_onnx = analyser.analyse(uid, items), onnx.analyse(uid, items)
    for a, b in zip(by_torch["images"], by_onnx["images"]):
        assert (a["status"], a["flagged"], a["side"]) == (b["status"], b["flagged"], b["side"])
        assert abs(a["probability"] - b["probability"]) < 1e-4
        assert abs(a["area_px"] - b["area_px"]) <= max(2, 0.01 * a["area_px"])
    assert any(image["flagged"] for image in by_onnx["images"])

    with pytest.raises(ValueError, match="backend"):
        StudyAnalyser.from_bundle_dir(tmp_path, demo_bundle, device="cpu", backend="tensorflow")


def test_auto_backend_runs_each_network_on_the_faster_and_measures_once_per_host(tmp_path, analyser, demo_bundle):
    """``auto``: per network, ONNX Runtime only when it is clearly faster than torch on this host;
    the measurement is recorded beside the export and reused, not taken again."""
    import json

    from worker.inference.onnx_backend import AUTO_MARGIN, OnnxNetwork, auto_networks

    models, bundle = analyser.models, analyser.bundle
    # A timer that makes ONNX Runtime faster for the segmenter only, by a margin each side of AUTO_MARGIN.
    timings = {(False, False): 1.0, (False, True): 1.0 / (AUTO_MARGIN * 0.95),  # classifier: torch, ONNX
               (True, False): 1.0, (True, True): 1.0 / (AUTO_MARGIN * 1.5)}  # segmenter: torch, ONNX
    calls: list[tuple[bool, bool]] = []

    def timer(network, example):
        onnx = isinstance(network, OnnxNetwork)
        segmenter = network.path.stem == "segmenter" if onnx else network is models.segmenter
        calls.append((segmenter, onnx))
        return timings[(segmenter, onnx)]

    networks, backends = auto_networks(models, bundle, tmp_path / "cache", timer=timer)
    assert backends == ("torch", "onnxruntime")
    assert networks[0] is models.classifier and isinstance(networks[1], OnnxNetwork)
    assert sorted(calls) == sorted(timings)  # each network timed on both backends
    records = sorted((tmp_path / "cache").glob("*/backend-choice.json"))
    assert len(records) == 2
    recorded = [next(iter(json.loads(path.read_text()).values()))["backend"] for path in records]
    assert sorted(recorded) == ["onnxruntime", "torch"]

    calls.clear()
    _, again = auto_networks(models, bundle, tmp_path / "cache", timer=timer)
    assert again == backends and calls == []  # read back, not measured again

    # Used for real: the analyser runs the chosen mix, and its decisions are torch's.
    auto = StudyAnalyser.from_bundle_dir(analyser.storage_dir, demo_bundle, device="cpu", backend="auto")
    assert set(auto.backends) <= {"torch", "onnxruntime"}
    uid, items = _study(analyser, 620, 2)
    by_torch, by_auto = analyser.analyse(uid, items)["images"], auto.analyse(uid, items)["images"]
    assert [a["status"] for a in by_auto] == ["analysed", "analysed"]
    for a, b in zip(by_torch, by_auto):
        assert (a["flagged"], a["side"]) == (b["flagged"], b["side"]) and abs(a["probability"] - b["probability"]) < 1e-4


def test_the_export_runs_in_a_child_process_and_its_failure_names_the_reason(tmp_path, demo_bundle):
    """The worker never imports the exporter (its leftovers slowed every later garbage collection);
    an export that fails says why."""
    import subprocess
    import sys

    from contract.bundle import load_bundle
    from worker.inference.onnx_backend import export_in_child

    script = (
        "import sys; from pathlib import Path; from worker.analysis import StudyAnalyser; "
        f"a = StudyAnalyser.from_bundle_dir(Path({str(tmp_path)!r}), Path({str(demo_bundle)!r}), device='cpu', "
        "backend='onnxruntime'); "
        "print(a.backends, 'onnxscript' in sys.modules)"  # the exporter's own library
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    assert done.stdout.strip().splitlines()[-1] == "('onnxruntime', 'onnxruntime') False"
    assert len(list((tmp_path / "onnx-cache").glob("*/*.onnx"))) == 2

    with pytest.raises(RuntimeError, match="cannot export .* to ONNX: unknown network 'detector'"):
        export_in_child(load_bundle(demo_bundle), {"detector": tmp_path / "detector.onnx"})


def test_auto_backend_without_onnx_runtime_stays_on_torch(tmp_path, analyser, monkeypatch, caplog):
    from worker.inference import onnx_backend

    def missing(*args, **kwargs):
        raise RuntimeError("ONNX Runtime is not installed")

    monkeypatch.setattr(onnx_backend, "onnx_networks", missing)
    with caplog.at_level("WARNING", logger=onnx_backend.__name__):
        networks, backends = onnx_backend.auto_networks(analyser.models, analyser.bundle, tmp_path)
    assert backends == ("torch", "torch")
    assert networks == (analyser.models.classifier, analyser.models.segmenter)
    assert "ONNX Runtime not usable: ONNX Runtime is not installed" in caplog.text


def _decoded(analyser: StudyAnalyser, seed: int, count: int) -> list[np.ndarray]:
    from contract.preprocess import decode_radiograph

    return [decode_radiograph(synthetic_dicom(seed=seed + k, positive=True, size=256)[0],
                              analyser.bundle.manifest.preprocessing) for k in range(count)]


def test_on_cuda_accelerate_sets_mixed_precision_channels_last_and_compiled_networks(analyser):
    """The CUDA branch's choices, checked without a GPU (nothing runs on the device here)."""
    import copy

    models = analyser.models
    on_gpu = type(models)(copy.deepcopy(models.classifier), copy.deepcopy(models.segmenter), models.manifest,
                          torch.device("cuda"))
    assert accelerate(on_gpu, "auto", compile_networks=True) is on_gpu
    assert on_gpu.autocast_dtype is torch.float16
    weight = next(p for p in on_gpu.segmenter.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert on_gpu.compiled is not None and on_gpu.compiled[0] is not on_gpu.classifier  # modules kept for Grad-CAM
    plain = type(models)(copy.deepcopy(models.classifier), copy.deepcopy(models.segmenter), models.manifest,
                         torch.device("cuda"))
    assert accelerate(plain, "fp32").autocast_dtype is None and plain.compiled is None


def test_the_pixel_data_of_an_image_not_analysed_is_never_read(analyser, monkeypatch):
    """Headers decide eligibility; an ineligible image's pixel data stays on disk, even while its
    header goes into the report."""
    import pydicom.filereader

    uid, items = _study(analyser, 700, 2)
    lateral_path = analyser.store.path(items[1]["key"])
    lateral = pydicom.dcmread(lateral_path)
    lateral.ViewPosition = "LL"
    lateral.save_as(lateral_path, enforce_file_format=True)
    deferred: list[str] = []
    original = pydicom.filereader.read_deferred_data_element
    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element",
                        lambda fileobj_type, filename, *a, **kw: deferred.append(str(filename))
                        or original(fileobj_type, filename, *a, **kw))
    summary = analyser.analyse(uid, items)
    statuses = [image["status"] for image in summary["images"]]
    assert statuses == ["analysed", "not_analysed"] and "lateral" in summary["images"][1]["reason"]
    assert str(analyser.store.path(items[0]["key"])) in deferred  # the analysed one: read when decoded
    assert str(lateral_path) not in deferred
    assert any(result["kind"] == "SR" for result in summary["results"])
