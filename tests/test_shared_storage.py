"""Shared storage for many hosts (node/shared_storage.py): a shared directory and an
S3-compatible object store (moto's server), the node's upload before dispatch (an acknowledged
study waits until the store takes it), a worker's fetch and clean-up, and the node's fetch of the
results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from config.settings import Settings, SettingsError, load_settings
from dicom_peers import free_port, storescu, wait_for
from node.ledger import Ledger
from node.service import NodeService
from node.shared_storage import (
    SharedStorage,
    SharedStorageError,
    analyse_with_shared_storage,
    fetch_results,
    split_storage_url,
    uploading_dispatcher,
)
from node.storage import InstanceStore
from services import MotoS3
from training.synthetic import synthetic_dicom

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.70", "1.2.826.0.1.3680043.8.498.71"


@pytest.fixture(scope="module")
def s3():
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, s3):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


@pytest.fixture(params=["file", "s3"])
def shared_url(request, tmp_path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'shared'}"
    s3 = request.getfixturevalue("aws_env")
    return s3.url(f"round-trip-{tmp_path.name}")


def _instance(store: InstanceStore, sop: str, data: bytes = b"DICM-bytes") -> str:
    return store.write_instance(STUDY, SERIES, sop, data)


def test_url_options_come_from_the_query():
    assert split_storage_url("s3://bucket/prefix?endpoint_url=http://minio:9000&anon=false") == (
        "s3://bucket/prefix", {"endpoint_url": "http://minio:9000", "anon": False}
    )
    assert split_storage_url("file:///mnt/pleura") == ("file:///mnt/pleura", {"auto_mkdir": True})


def test_a_wrong_url_is_refused_with_the_setting_named(tmp_path):
    with pytest.raises(SettingsError, match="PLEURA_SHARED_STORAGE_URL"):
        load_settings(storage_dir=tmp_path, shared_storage_url="/mnt/no-scheme")
    with pytest.raises(SharedStorageError, match="PLEURA_SHARED_STORAGE_URL"):
        SharedStorage("nosuchprotocol://bucket/prefix")
    assert Settings(storage_dir=tmp_path, shared_storage_url="").shared_storage_url is None


def test_files_go_round_trip_between_two_storage_dirs(tmp_path, shared_url):
    node, worker = InstanceStore(tmp_path / "node"), InstanceStore(tmp_path / "worker")
    keys = [_instance(node, "1.2.3.1", b"first"), _instance(node, "1.2.3.2", b"second")]
    shared = SharedStorage(shared_url)
    shared.upload(node, keys)

    fetched, missing = shared.download(worker, [*keys, f"instances/{STUDY}/{SERIES}/9.9.9.dcm"])
    assert fetched == keys and missing == [f"instances/{STUDY}/{SERIES}/9.9.9.dcm"]
    assert [worker.path(key).read_bytes() for key in keys] == [b"first", b"second"]
    assert shared.download(worker, keys) == ([], [])  # already in the cache: nothing fetched
    assert shared.check() == shared.url
    with pytest.raises(ValueError):
        shared.remote("../outside.dcm")


def test_the_node_uploads_before_it_dispatches_and_keeps_the_study_when_it_cannot(tmp_path, aws_env):
    node = InstanceStore(tmp_path / "node")
    key = _instance(node, "1.2.3.1")
    sent: list[str] = []

    def dispatch(study_uid, instances):
        sent.append(study_uid)
        return "task-1"

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    broken = uploading_dispatcher(SharedStorage(f"file://{blocker}/shared"), node, dispatch)
    with pytest.raises(SharedStorageError, match="cannot upload"):
        broken(STUDY, [{"sop_instance_uid": "1.2.3.1", "key": key}])
    assert sent == []  # not dispatched: the settle loop tries again next round

    working = uploading_dispatcher(SharedStorage(aws_env.url("dispatch")), node, dispatch)
    assert working(STUDY, [{"sop_instance_uid": "1.2.3.1", "key": key}]) == "task-1"
    assert sent == [STUDY] and f"dispatch/{key}" in aws_env.keys()


def test_a_worker_fetches_analyses_uploads_and_clears_its_cache(tmp_path, aws_env):
    url = aws_env.url("worker")
    node = InstanceStore(tmp_path / "node")
    keys = [_instance(node, "1.2.3.1", b"image-1"), _instance(node, "1.2.3.2", b"image-2")]
    SharedStorage(url).upload(node, keys)
    worker_settings = Settings(storage_dir=tmp_path / "worker", shared_storage_url=url)
    worker = InstanceStore(worker_settings.storage_dir)
    kept = _instance(worker, "1.2.3.2", b"image-2")  # already there before: the worker leaves it

    def analyse(study_uid, instances, options):
        seen = [worker.path(item["key"]).read_bytes() for item in instances]
        result_key = f"results/{study_uid}/1.2.3.99.dcm"
        worker.path(result_key).parent.mkdir(parents=True, exist_ok=True)
        worker.path(result_key).write_bytes(b"SR of " + b"+".join(seen))
        return {"study_uid": study_uid, "results": [{"key": result_key}], "options": options}

    instances = [{"sop_instance_uid": k.rsplit("/", 1)[1][:-4], "key": k} for k in keys]
    summary = analyse_with_shared_storage(analyse, worker_settings, STUDY, instances, {"objects": ["SR"]})
    assert summary["options"] == {"objects": ["SR"]}
    assert not worker.path(keys[0]).exists() and not worker.path(summary["results"][0]["key"]).exists()
    assert worker.path(kept).read_bytes() == b"image-2"

    node_settings = Settings(storage_dir=tmp_path / "node", shared_storage_url=url)
    fetch_results(node_settings, node, summary)
    assert node.path(summary["results"][0]["key"]).read_bytes() == b"SR of image-1+image-2"
    with pytest.raises(SharedStorageError, match="not in the shared storage"):
        fetch_results(node_settings, node, {"results": [{"key": f"results/{STUDY}/4.4.4.dcm"}]})


def test_without_a_shared_storage_url_nothing_moves(tmp_path):
    settings = Settings(storage_dir=tmp_path)
    calls = []
    summary = analyse_with_shared_storage(
        lambda *args: calls.append(args) or {"results": []}, settings, STUDY, [], None
    )
    assert summary == {"results": []} and len(calls) == 1
    fetch_results(settings, InstanceStore(tmp_path), {"results": [{"key": "results/1/2.dcm"}]})  # no error
    assert not Path(tmp_path / "results").exists()


def test_an_acknowledged_study_waits_in_the_ledger_until_the_shared_storage_takes_it(tmp_path, demo_bundle):
    blocker = tmp_path / "shared"
    blocker.write_text("a file where the shared folder should be: every upload fails")
    settings = Settings(
        storage_dir=tmp_path / "node", host="127.0.0.1", port=free_port(), metrics_port=free_port(),
        model_bundle_dir=demo_bundle, settle_seconds=0.2, shared_storage_url=f"file://{blocker}/store",
    )
    dataset, _ = synthetic_dicom(seed=21, positive=False, size=64)
    image = tmp_path / "image.dcm"
    dataset.save_as(image, enforce_file_format=True)
    with NodeService(settings, export_worker=False, worklist=False, settle_interval_seconds=0.1) as node:
        sent = storescu(settings.port, [image], called_ae="PLEURA")
        assert sent.returncode == 0, sent.stderr  # acknowledged: on the node's disk and in its ledger
        ledger: Ledger = node.ledger
        time.sleep(1.5)  # several settle rounds, each failing to upload
        assert ledger.study_status(dataset.StudyInstanceUID)["status"] == "receiving"
        key = ledger.list_instances(dataset.StudyInstanceUID)[0].storage_key
        assert node.store.path(key).is_file()

        blocker.unlink()
        blocker.mkdir()  # the shared storage is back
        wait_for(lambda: ledger.study_status(dataset.StudyInstanceUID)["status"] == "queued", 30,
                 "the study to be uploaded and dispatched")
        assert (blocker / "store" / key).read_bytes() == node.store.path(key).read_bytes()
