"""The analysis process pool (worker/pool.py): the same results as one process, no block left behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pydicom
import pytest

from config.settings import Settings
from training.synthetic import synthetic_dicom
from worker.analysis import StudyAnalyser
from worker.pool import AnalysisPool, AnalysisPoolBroken, analysis_pool, block_name
from worker.startup import PoolPolicy, WorkerStartError, check_analysis_pool, pool_policy

SHM = Path("/dev/shm")


def _blocks() -> set[str]:
    """The shared-memory blocks this test process's analysis pools made (other test processes may
    run pools of their own at the same time)."""
    mine = block_name(os.getpid()).rsplit("-", 1)[0] + "-"
    return {name for name in os.listdir(SHM) if name.startswith(mine)} if SHM.is_dir() else set()


@pytest.fixture(scope="module")
def pool():
    pool = AnalysisPool(2)
    yield pool
    pool.shutdown()


def _analysers(tmp_path: Path, demo_bundle: Path, pool: AnalysisPool) -> tuple[StudyAnalyser, StudyAnalyser]:
    """One analyser without a pool and one with, each on storage of its own, batches of 2 images
    (so the pool decodes the next batch while the networks run on this one)."""
    alone = StudyAnalyser.from_bundle_dir(tmp_path / "alone", demo_bundle, device="cpu", batch_size=2)
    pooled = StudyAnalyser.from_bundle_dir(tmp_path / "pooled", demo_bundle, device="cpu", batch_size=2, pool=pool)
    return alone, pooled


def _store(analysers: tuple[StudyAnalyser, ...], ds: pydicom.Dataset, name: str | None = None) -> dict[str, str]:
    """``ds`` stored in each analyser's storage under the same key."""
    name = name or str(ds.SOPInstanceUID)
    key = f"instances/study/series/{name}.dcm"
    for analyser in analysers:
        path = analyser.storage_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    return {"sop_instance_uid": name, "key": key}


def _study(analysers: tuple[StudyAnalyser, ...], seeds: list[int], positive: set[int], size: int) -> tuple[str, list]:
    items, study_uid = [], None
    for seed in seeds:
        ds, _ = synthetic_dicom(seed=seed, positive=seed in positive, size=size)
        study_uid = study_uid or str(ds.StudyInstanceUID)
        ds.StudyInstanceUID = study_uid
        items.append(_store(analysers, ds))
    return study_uid, items


def _written(analyser: StudyAnalyser, summary: dict) -> dict[str, bytes]:
    return {result["key"]: (analyser.storage_dir / result["key"]).read_bytes() for result in summary["results"]}


def _without_time(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if key != "analysed_at"}


def test_the_pool_writes_the_same_bytes_as_one_process(tmp_path, demo_bundle, pool):
    """Six 1024 px images (two flagged), one whose pixel data is cut short and a file that is not
    DICOM: every result file byte for byte, and the summaries, as without the pool; no block left."""
    before = _blocks()
    alone, pooled = analysers = _analysers(tmp_path, demo_bundle, pool)
    study_uid, items = _study(analysers, list(range(300, 306)), {300, 303}, 1024)
    broken, _ = synthetic_dicom(seed=306, positive=False, size=256)
    broken.StudyInstanceUID = study_uid
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]
    items.append(_store(analysers, broken))
    items.append({"sop_instance_uid": "1.2.3.9", "key": "instances/study/series/not-dicom.dcm"})
    for analyser in analysers:
        (analyser.storage_dir / items[-1]["key"]).write_bytes(b"not a DICOM file")

    expected = alone.analyse(study_uid, items)
    got = pooled.analyse(study_uid, items)

    statuses = [(image["status"], image.get("flagged")) for image in expected["images"]]
    assert statuses.count(("analysed", True)) == 2 and statuses.count(("analysed", False)) == 4
    assert [image["status"] for image in expected["images"][-2:]] == ["not_analysed", "failed"]
    assert _without_time(got) == _without_time(expected)
    first, second = _written(alone, expected), _written(pooled, got)
    assert sorted(first) == sorted(second) and len(first) == 2 * 1 + 6 * 2 + 1  # SEG x2, GSPS+SC x6, SR
    assert [key for key in first if first[key] != second[key]] == []
    assert _blocks() - before == set()


def test_the_pool_draws_the_same_heat_map(tmp_path, demo_bundle, pool):
    """The Grad-CAM runs where the networks are and reaches the pool's SC through shared memory."""
    alone, pooled = analysers = _analysers(tmp_path, demo_bundle, pool)
    study_uid, items = _study(analysers, [310, 311], {310}, 512)
    options = {"objects": ["SC"], "sc_heatmap": True}
    expected, got = alone.analyse(study_uid, items, options), pooled.analyse(study_uid, items, options)
    assert _without_time(got) == _without_time(expected)
    assert sorted(r["kind"] for r in got["results"]) == ["SC", "SC", "SEG", "SR"]
    first, second = _written(alone, expected), _written(pooled, got)
    assert all(first[key] == second[key] for key in first)


def test_a_result_that_cannot_be_written_in_the_pool_fails_that_image_alone(tmp_path, demo_bundle, pool):
    """A directory where one image's GSPS goes: that image fails with the reason, as without the
    pool; the others are analysed and no block is left."""
    before = _blocks()
    alone, pooled = analysers = _analysers(tmp_path, demo_bundle, pool)
    study_uid, items = _study(analysers, [320, 321, 322], {320}, 512)
    first = alone.analyse(study_uid, items)
    [gsps] = [r for r in first["results"] if r["kind"] == "GSPS" and r["source_sop_instance_uid"] == items[1]["sop_instance_uid"]]
    for analyser in analysers:
        (analyser.storage_dir / gsps["key"]).unlink(missing_ok=True)
        (analyser.storage_dir / gsps["key"] / "occupied").mkdir(parents=True)

    expected, got = alone.analyse(study_uid, items), pooled.analyse(study_uid, items)
    by_uid = {image["sop_instance_uid"]: image for image in got["images"]}
    failed = by_uid[items[1]["sop_instance_uid"]]
    assert failed["status"] == "failed" and failed["reason"].startswith("its results could not be written (")
    assert [by_uid[item["sop_instance_uid"]]["status"] for item in (items[0], items[2])] == ["analysed"] * 2
    assert _without_time(got) == _without_time(expected)
    assert _written(alone, expected).keys() == _written(pooled, got).keys()
    assert _blocks() - before == set()


def test_a_pool_whose_process_died_fails_the_analysis_and_is_replaced(tmp_path, demo_bundle):
    """A pool process killed: the analysis that meets the broken pool fails (Celery retries it), the
    next one gets a new pool and succeeds; no block is left either time."""
    before = _blocks()
    pool = AnalysisPool(1)
    try:
        analyser = StudyAnalyser.from_bundle_dir(tmp_path, demo_bundle, device="cpu", batch_size=2, pool=pool)
        study_uid, items = _study((analyser,), [330, 331], set(), 256)
        pool.warm()
        [pid] = pool.pids
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(AnalysisPoolBroken):
            analyser.analyse(study_uid, items)
        assert _blocks() - before == set()
        summary = analyser.analyse(study_uid, items)
        assert [image["status"] for image in summary["images"]] == ["analysed", "analysed"]
        assert pool.pids and pid not in pool.pids
    finally:
        pool.shutdown()
    assert _blocks() - before == set()


def test_the_worker_builds_its_analysers_on_one_pool_of_the_setting(tmp_path, demo_bundle):
    """for_settings: the process's pool of analysis_processes, the same for a reloaded model; 0: none."""
    settings = Settings(storage_dir=tmp_path, analysis_processes=3, inference_backend="torch", device="cpu")
    first = StudyAnalyser.for_settings(settings, demo_bundle)
    reloaded = StudyAnalyser.for_settings(settings, demo_bundle)
    assert first.pool is not None and first.pool is reloaded.pool is analysis_pool(3)
    assert first.pool.processes == 3 and first.pool.pids == []  # started by the warm-up or the first study
    none = StudyAnalyser.for_settings(settings.model_copy(update={"analysis_processes": 0}), demo_bundle)
    assert none.pool is None


def test_a_prefork_worker_with_an_analysis_pool_is_refused_in_one_line():
    """Celery's prefork processes are daemonic and may not start processes: refused at start-up."""
    settings = Settings(analysis_processes=2)
    with pytest.raises(WorkerStartError) as refused:
        check_analysis_pool(settings, pool_policy(settings, concurrency=2))
    message = str(refused.value)
    assert "PLEURA_ANALYSIS_PROCESSES=2" in message and "\n" not in message
    check_analysis_pool(settings, pool_policy(settings, concurrency=1))  # solo: allowed
    check_analysis_pool(settings.model_copy(update={"worker_threads": 4}), pool_policy(settings, 1))
    check_analysis_pool(Settings(analysis_processes=0), PoolPolicy("prefork", 2, 2))


def test_studies_in_flight_share_the_pool_and_the_forward_passes(tmp_path, demo_bundle, pool):
    """worker_threads > 1: three studies analysed at once from threads, on one pool and one batcher,
    write what each writes alone, and leave no block."""
    from concurrent.futures import ThreadPoolExecutor

    before = _blocks()
    alone = StudyAnalyser.from_bundle_dir(tmp_path / "alone", demo_bundle, device="cpu", batch_size=4)
    pooled = StudyAnalyser.from_bundle_dir(
        tmp_path / "pooled", demo_bundle, device="cpu", batch_size=4, batch_wait_s=0.05, pool=pool
    )
    studies = [_study((alone, pooled), [340 + 3 * n, 341 + 3 * n, 342 + 3 * n], {340}, 512) for n in range(3)]
    expected = [alone.analyse(study_uid, items) for study_uid, items in studies]
    with ThreadPoolExecutor(3) as threads:
        got = list(threads.map(lambda study: pooled.analyse(*study), studies))
    assert [_without_time(s) for s in got] == [_without_time(s) for s in expected]
    for first, second in zip(expected, got):
        a, b = _written(alone, first), _written(pooled, second)
        assert sorted(a) == sorted(b) and all(a[key] == b[key] for key in a)
    assert _blocks() - before == set()


def _stage_counts(kind: str = "_count") -> dict[str, float]:
    """How many analyses each stage of ``pleura_worker_stage_seconds`` has seen in this process
    (``_sum``: their seconds)."""
    from node.ops.worker_metrics import STAGE_SECONDS

    return {
        sample.labels["stage"]: sample.value
        for metric in STAGE_SECONDS.collect()
        for sample in metric.samples
        if sample.name.endswith(kind)
    }


@pytest.mark.parametrize("pooled", [False, True], ids=["one process", "pool"])
def test_each_analysis_times_its_stages_for_the_metrics(tmp_path, demo_bundle, pool, pooled):
    """With or without the pool (whose processes time their own work), an analysis of a flagged
    and a negative image adds one observation to each of its stages, and the pool's own stages
    (decoding, each object) take time that is counted."""
    alone, with_pool = _analysers(tmp_path, demo_bundle, pool)
    analyser = with_pool if pooled else alone
    study_uid, items = _study((analyser,), [310, 311], {310}, 512)
    before, seconds_before = _stage_counts(), _stage_counts("_sum")

    summary = analyser.analyse(study_uid, items)

    assert summary["flagged"] is True
    after, seconds_after = _stage_counts(), _stage_counts("_sum")
    stages = ("read", "decode", "forward", "measure", "SEG", "GSPS", "SC", "SR")
    assert {stage: after.get(stage, 0) - before.get(stage, 0) for stage in stages} == dict.fromkeys(stages, 1)
    assert all(seconds_after[stage] > seconds_before.get(stage, 0) for stage in ("decode", "SEG", "SC"))
