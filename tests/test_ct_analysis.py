"""The CT worker path on phantom series: the demo CT model measures the known volume; bad series
are reported, not lost; CT series and radiographs go to different queues."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from config.settings import Settings
from dicom_samples import dciodvfy_errors
from contract.bundle import load_bundle
from contract.tasks import ANALYSE_SERIES_CT, ANALYSE_STUDY, CT_QUEUE, RADIOGRAPH_QUEUE, TASK_ROUTES
from node.dispatch import dispatch_analysis
from node.routing import route_instances
from training.ct_synthetic import make_phantom, phantom_datasets
from training.synthetic import synthetic_dicom
from contract.celery_app import make_celery
from worker.ct_analysis import SeriesAnalyser

PHANTOM_SEED = 11


def _store_series(storage: Path, datasets: list[pydicom.Dataset]) -> list[dict[str, str]]:
    instances = []
    for ds in datasets:
        key = f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        path = storage / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        instances.append(
            {"sop_instance_uid": ds.SOPInstanceUID, "key": key, "series_instance_uid": ds.SeriesInstanceUID,
             "sop_class_uid": ds.SOPClassUID}
        )
    return instances


@pytest.fixture(scope="module")
def analyser(ct_demo_bundle: Path, tmp_path_factory) -> SeriesAnalyser:
    return SeriesAnalyser(tmp_path_factory.mktemp("ct-storage"), load_bundle(ct_demo_bundle), device="cpu")


def test_the_demo_ct_model_measures_the_phantom_volume(analyser: SeriesAnalyser) -> None:
    phantom = make_phantom(PHANTOM_SEED, slices=40, size=128)
    datasets = phantom_datasets(phantom)
    instances = _store_series(analyser.store.root, datasets)
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID

    summary = analyser.analyse(study, series, instances)

    assert summary["flagged"] is True
    assert summary["side"] == phantom.side
    assert summary["volume_ml"] == pytest.approx(phantom.mask_volume_ml, rel=0.05)
    assert {image["status"] for image in summary["images"]} == {"analysed"}
    flagged_slices = {image["sop_instance_uid"] for image in summary["images"] if image["flagged"]}
    assert flagged_slices  # the slices the mask touches
    kinds = sorted(result["kind"] for result in summary["results"])
    assert kinds == ["SEG", "SR"]
    for result in summary["results"]:
        assert dciodvfy_errors(analyser.store.path(result["key"])) == []
    again = analyser.analyse(study, series, instances)
    assert [r["sop_instance_uid"] for r in again["results"]] == [r["sop_instance_uid"] for r in summary["results"]]


def test_a_series_with_a_foreign_slice_is_reported_not_analysed(analyser: SeriesAnalyser) -> None:
    phantom = make_phantom(PHANTOM_SEED + 1, slices=8, size=64)
    datasets = phantom_datasets(phantom, case_id="SYNCT-mixed")
    radiograph, _ = synthetic_dicom(seed=5, positive=False, size=64)
    radiograph.StudyInstanceUID = datasets[0].StudyInstanceUID
    radiograph.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    instances = _store_series(analyser.store.root, datasets + [radiograph])

    summary = analyser.analyse(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, instances)

    assert summary["flagged"] is False
    statuses = {image["sop_instance_uid"]: image for image in summary["images"]}
    assert statuses[radiograph.SOPInstanceUID]["reason"] == "modality DX is not CT"
    assert all(image["status"] == "not_analysed" for image in summary["images"])
    assert all("CT series not analysed" in image["reason"] for uid, image in statuses.items() if uid != radiograph.SOPInstanceUID)
    assert [result["kind"] for result in summary["results"]] == ["SR"]  # never silent
    assert dciodvfy_errors(analyser.store.path(summary["results"][0]["key"])) == []
    report = pydicom.dcmread(analyser.store.path(summary["results"][0]["key"]))
    procedure = [item for item in report.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeMeaning == "CT of chest"


def test_ct_series_and_radiographs_go_to_separate_queues(tmp_path: Path) -> None:
    from test_node_dispatch import Redis, next_message

    import dicom_peers

    phantom = make_phantom(3, slices=4, size=32)
    ct = [
        {"sop_instance_uid": ds.SOPInstanceUID, "key": f"k/{ds.SOPInstanceUID}", "series_instance_uid": "9.1",
         "sop_class_uid": ds.SOPClassUID}
        for ds in phantom_datasets(phantom)
    ]
    other_series = [dict(ct[0], series_instance_uid="9.2", sop_instance_uid="9.2.1")]
    radiograph = [{"sop_instance_uid": "1.1", "key": "k/1.1", "series_instance_uid": "8.1",
                   "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1"}]
    routed = route_instances(radiograph + ct + other_series)
    assert routed.radiograph == radiograph and set(routed.ct_series) == {"9.1", "9.2"}
    assert TASK_ROUTES[ANALYSE_SERIES_CT]["queue"] == CT_QUEUE != TASK_ROUTES[ANALYSE_STUDY]["queue"]

    redis = Redis(tmp_path / "redis", dicom_peers.free_port())
    try:
        app = make_celery(Settings(storage_dir=tmp_path, broker_url=f"redis://127.0.0.1:{redis.port}/0"))
        task_id = dispatch_analysis(app, "7.7", radiograph + ct + other_series, options={"objects": ["SR", "SEG"]})
        headers, (args, _, _) = next_message(app, RADIOGRAPH_QUEUE)
        assert headers["task"] == ANALYSE_STUDY and headers["id"] == task_id
        assert args[1] == radiograph  # a radiograph worker never sees a CT slice
        seen = {}
        for _ in range(2):
            headers, (args, _, _) = next_message(app, CT_QUEUE)
            assert headers["task"] == ANALYSE_SERIES_CT
            seen[args[1]] = args[2]
        assert seen == {"9.1": ct, "9.2": other_series}
    finally:
        redis.stop()
    shutil.rmtree(tmp_path / "redis", ignore_errors=True)


def test_a_late_slice_sends_its_whole_ct_series_again(tmp_path: Path) -> None:
    from node.ledger import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ct_class = pydicom.uid.CTImageStorage

    def receive(sop: str, series: str = "5.1", sop_class: str = ct_class) -> None:
        ledger.record_instance(
            sop_instance_uid=sop, study_uid="5", series_instance_uid=series, sop_class_uid=sop_class,
            transfer_syntax_uid="1.2.840.10008.1.2.1", storage_key=f"instances/5/{series}/{sop}.dcm",
        )

    for sop in ("5.1.1", "5.1.2"):
        receive(sop)
    receive("5.2.1", series="5.2", sop_class="1.2.840.10008.5.1.4.1.1.1")  # a CR in the same study
    [due] = ledger.due_studies(0)
    assert [i["sop_instance_uid"] for i in due.instances] == ["5.1.1", "5.1.2", "5.2.1"]
    ledger.mark_queued("5", [i["sop_instance_uid"] for i in due.instances], task_id="t1")
    ledger.record_analysis({
        "study_uid": "5", "model": {"name": "m", "version": "1"}, "results": [],
        "images": [{"sop_instance_uid": uid, "status": "analysed"} for uid in ("5.1.1", "5.1.2", "5.2.1")],
    })
    receive("5.1.3")  # a late slice re-opens the study

    [due] = ledger.due_studies(0)
    assert sorted(i["sop_instance_uid"] for i in due.instances) == ["5.1.1", "5.1.2", "5.1.3"]  # not the CR
    routed = route_instances(due.instances)
    assert not routed.radiograph and len(routed.ct_series["5.1"]) == 3
