"""A CT series the whole way: storescu -> `pleura node` -> the CT queue's `pleura worker` -> Orthanc,
beside a radiograph that a radiograph-only worker analyses at the same time.

The phantom's pneumothorax has a known volume; the SR at the PACS must report it within 5 %, the
multi-frame SEG must have frames only where the mask is, at the source slices' positions and in
their Frame of Reference, and dciodvfy must find no error in either.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_samples import dciodvfy_errors
from node.ledger import Ledger
from services import Orthanc, find_tool, free_port, pleura_process, port_open, wait_for, write_config
from training.ct_synthetic import make_phantom, write_ct_series
from training.synthetic import synthetic_dicom

RESULT_TIMEOUT = 420


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


def _volume_ml(report: pydicom.Dataset) -> float:
    def walk(items):
        for item in items:
            yield item
            yield from walk(item.get("ContentSequence", []))

    [value] = [
        item.MeasuredValueSequence[0]
        for item in walk(report.ContentSequence)
        if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == "118565006"
    ]
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "ml"
    return float(value.NumericValue)


def test_ct_series_to_orthanc_beside_a_radiograph(tmp_path: Path, demo_bundle, ct_demo_bundle, orthanc) -> None:
    import subprocess

    phantom = make_phantom(11, slices=40, size=128)
    files = write_ct_series(phantom, tmp_path / "ct")
    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    ct_study = next(iter(sources.values())).StudyInstanceUID
    radiograph, _ = synthetic_dicom(seed=4243, positive=True, size=256)
    radiograph_path = tmp_path / "radiograph.dcm"
    radiograph.save_as(radiograph_path, enforce_file_format=True)

    port, storage = free_port(), tmp_path / "storage"
    common = dict(
        ae_title="PLEURA", host="127.0.0.1", port=port, storage_dir=storage, model_bundle_dir=demo_bundle,
        ct_model_dir=ct_demo_bundle, device="cpu", settle_seconds=1.0, export_retry_seconds=2.0,
        destinations=[{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
    )
    node = pleura_process("node", write_config(tmp_path / "node.toml", **common), tmp_path / "node.log")
    ct_worker = pleura_process(
        "worker", write_config(tmp_path / "ct.toml", **common, worker_queues=["ct"]), tmp_path / "ct-worker.log"
    )
    xr_worker = pleura_process(
        "worker", write_config(tmp_path / "xr.toml", **common, worker_queues=["radiograph"]), tmp_path / "xr.log"
    )
    processes = (node, ct_worker, xr_worker)

    def logs() -> str:
        return "\n".join(f"--- {name} ---\n{p.output()[-5000:]}" for name, p in zip(("node", "ct", "xr"), processes))

    try:
        wait_for(lambda: port_open(port) or not node.alive(), 60, "pleura node to listen")
        sent = subprocess.run(
            [find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(port),
             *map(str, files), str(radiograph_path)],
            capture_output=True, text=True, timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")

        def delivered() -> bool:
            assert all(p.alive() for p in processes), logs()
            statuses = {uid: (ledger.study_status(uid) or {}).get("status")
                        for uid in (ct_study, radiograph.StudyInstanceUID)}
            assert not {"failed", "delivery_failed", "not_analysed"} & set(statuses.values()), (statuses, logs())
            return all(status == "delivered" for status in statuses.values())

        try:
            wait_for(delivered, RESULT_TIMEOUT, "the CT and the radiograph delivered", interval=1.0)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None

        # Each worker took only its own queue's work.
        assert re.search(r"pleura\.analyse_series_ct\[[0-9a-f-]+\] received", ct_worker.output()), logs()
        assert "pleura.analyse_study[" not in ct_worker.output()
        assert re.search(r"pleura\.analyse_study\[[0-9a-f-]+\] received", xr_worker.output()), logs()
        assert "pleura.analyse_series_ct[" not in xr_worker.output()

        status = ledger.study_status(ct_study)
        assert status["flagged"] is True and status["model_name"] == "pleura-ct-demo"
        results: dict[str, pydicom.Dataset] = {}
        for tags in orthanc.instances():
            if tags.get("StudyInstanceUID") != ct_study or tags.get("SOPInstanceUID") in sources:
                continue
            path = orthanc.download(tags["_id"], tmp_path / f"{tags['_id']}.dcm")
            ds = pydicom.dcmread(path)
            assert dciodvfy_errors(path) == [], f"dciodvfy errors in {ds.Modality} {path}"
            results[ds.Modality] = ds
        assert set(results) == {"SEG", "SR"}

        assert _volume_ml(results["SR"]) == pytest.approx(phantom.mask_volume_ml, rel=0.05)
        seg = results["SEG"]
        assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
        frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
        assert all(frame.any() for frame in frames)  # frames only where the mask is not empty
        touched = {i for i in range(phantom.pneumothorax.shape[0]) if phantom.pneumothorax[i].any()}
        assert abs(len(frames) - len(touched)) <= 2
        for item in seg.PerFrameFunctionalGroupsSequence:
            source = sources[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
            position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
            assert np.allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-3)
    finally:
        for process in processes:
            process.stop()
