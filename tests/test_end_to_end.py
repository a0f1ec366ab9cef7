"""The whole path with real peers: storescu -> `pleura node` -> Celery -> `pleura worker` -> Orthanc.

Real Redis (and the embedded broker), a real Celery worker process running the demo model, DCMTK
as the modality, Orthanc as the PACS and dciodvfy as the judge of every object Pleura wrote.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from node.ledger import Ledger
from node.ledger.schema import Study
from services import Orthanc, RedisServer, find_tool, free_port, pleura_process, port_open, wait_for, write_config
from dicom_samples import comprehensive_sr, dciodvfy_errors, presentation_state, pydicom_data_file, save_dataset
from training.synthetic import synthetic_dicom

RESULT_TIMEOUT = 900  # CPU inference of a 2.5k x 3k radiograph on 2 loaded cores, plus process start-up


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def synthetic_positive(tmp_path) -> tuple[Path, pydicom.Dataset]:
    dataset, _ = synthetic_dicom(seed=4242, positive=True, size=512)
    path = tmp_path / "synthetic_positive.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, dataset


class Pleura:
    """A running `pleura node` and `pleura worker` pair on one configuration."""

    def __init__(
        self, folder: Path, bundle: Path, orthanc: Orthanc, broker_url: str | None,
        objects: list[str] | None = None, sc_heatmap: bool = False, env: dict[str, str] | None = None,
        destinations: list[dict] | None = None, **settings: object,
    ):
        self.port = free_port()
        self.storage = folder / "storage"
        values = dict(
            ae_title="PLEURA",
            host="127.0.0.1",
            port=self.port,
            metrics_port=free_port(),  # not the default: another node on this host may hold it
            storage_dir=self.storage,
            # `bundle`: a bundle directory (it holds the manifest), or a model registry
            **({"model_bundle_dir": bundle} if (Path(bundle) / "manifest.json").is_file() else {"model_registry_dir": bundle}),
            device="cpu",
            settle_seconds=1.0,
            export_retry_seconds=2.0,
            sc_heatmap=sc_heatmap,
            destinations=destinations or [
                {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
                | ({"objects": objects} if objects else {})
            ],
            **settings,
        )
        if broker_url:
            values["broker_url"] = broker_url
        self.config = write_config(folder / "pleura.toml", **values)
        self.node = pleura_process("node", self.config, folder / "node.log", env)
        self.worker = pleura_process("worker", self.config, folder / "worker.log", env)
        wait_for(lambda: port_open(self.port) or not self.node.alive(), 60, "pleura node to listen")
        assert self.node.alive(), self.node.output()

    @property
    def ledger(self) -> Ledger:
        return Ledger(f"sqlite:///{self.storage / 'ledger.sqlite'}")

    def storescu(self, *files: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [find_tool("storescu"), *options, "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(self.port),
             *map(str, files)],
            capture_output=True, text=True, timeout=120,
        )

    def logs(self) -> str:
        return f"--- node ---\n{self.node.output()[-6000:]}\n--- worker ---\n{self.worker.output()[-6000:]}"

    def stop(self) -> None:
        self.worker.stop()
        self.node.stop()


KIND_BY_CLASS = {
    pydicom.uid.SegmentationStorage: "SEG",
    pydicom.uid.ComprehensiveSRStorage: "SR",
    pydicom.uid.GrayscaleSoftcopyPresentationStateStorage: "GSPS",
    pydicom.uid.SecondaryCaptureImageStorage: "SC",
}


def _check_results(
    orthanc: Orthanc, source: pydicom.Dataset, folder: Path, ledger: Ledger, kinds: set[str],
    others: frozenset[str] = frozenset(),
) -> dict[str, pydicom.Dataset]:
    """Download what Orthanc holds of `source`'s study besides the source (and the SOP Instance
    UIDs `others`), check every object is valid, filed in the source's study and references it, and
    that its kinds are `kinds` (the SEG only when the ledger says the image was flagged)."""
    flagged = ledger.study_status(source.StudyInstanceUID)["flagged"]
    expected = set(kinds) - ({"SEG"} if not flagged else set())
    source_study = next(
        (orthanc.get(f"/instances/{tags['_id']}/study")["ID"] for tags in orthanc.instances()
         if tags.get("SOPInstanceUID") == source.SOPInstanceUID),
        None,
    )
    found: dict[str, list[pydicom.Dataset]] = {}
    for tags in orthanc.instances():
        if tags.get("StudyInstanceUID") != source.StudyInstanceUID or tags.get("SOPInstanceUID") == source.SOPInstanceUID:
            continue
        if tags.get("SOPInstanceUID") in others:
            continue
        path = orthanc.download(tags["_id"], folder / f"{tags['_id']}.dcm")
        ds = pydicom.dcmread(path)
        kind = KIND_BY_CLASS[ds.SOPClassUID]
        assert dciodvfy_errors(path) == [], f"dciodvfy errors in {kind} {path}"
        if source_study is not None:
            assert orthanc.get(f"/instances/{tags['_id']}/study")["ID"] == source_study, f"{kind} filed elsewhere"
        assert ds.PatientID == source.PatientID and ds.PatientName == source.PatientName
        assert "DEMO" in ds.SeriesDescription.upper()
        found.setdefault(kind, []).append(ds)
    assert set(found) == expected, (set(found), expected)
    assert all(len(objects) == 1 for objects in found.values()), {k: len(v) for k, v in found.items()}
    results = {kind: objects[0] for kind, objects in found.items()}

    sr_refs = {
        inst.ReferencedSOPInstanceUID
        for study in results["SR"].CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert source.SOPInstanceUID in sr_refs
    if "SEG" in results:
        seg = results["SEG"]
        assert source.SOPInstanceUID in {
            inst.ReferencedSOPInstanceUID
            for series in seg.ReferencedSeriesSequence
            for inst in series.ReferencedInstanceSequence
        }
        if "SR" in results:
            assert seg.SOPInstanceUID in sr_refs
    if "GSPS" in results:
        referenced = results["GSPS"].ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    if "SC" in results:
        assert results["SC"].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    return results


def _dispatch_record(ledger: Ledger, study_uid: str) -> tuple:
    """What a dispatch of the study changes in the ledger: its task, its queued time, and when a
    worker last took it."""
    with ledger.reading() as session:
        study = session.get(Study, study_uid)
        return study.task_id, study.queued_at, ledger.analysis_started_at(study_uid)


def _wait_for_delivery(pleura: Pleura, study_uids: set[str]) -> None:
    ledger = pleura.ledger

    def delivered() -> bool:
        assert pleura.node.alive(), pleura.logs()
        assert pleura.worker.alive(), pleura.logs()
        statuses = {uid: (ledger.study_status(uid) or {}).get("status") for uid in study_uids}
        assert not {"failed", "delivery_failed"} & set(statuses.values()), (statuses, pleura.logs())
        return all(status == "delivered" for status in statuses.values())

    try:
        wait_for(delivered, RESULT_TIMEOUT, "every study delivered to Orthanc", interval=1.0)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{pleura.logs()}") from None


def test_redis_path_real_radiograph_and_synthetic_to_orthanc(tmp_path, demo_bundle, orthanc, redis_server, synthetic_positive):
    real_path = pydicom_data_file("RG1_UNCR.dcm")
    real = pydicom.dcmread(real_path, stop_before_pixels=True)
    assert real.PhotometricInterpretation == "MONOCHROME1" and real.BitsStored == 15
    synth_path, synth = synthetic_positive
    # The modality sends to the PACS as well: results must be filed in the images' own studies.
    to_pacs = subprocess.run(
        [find_tool("storescu"), "-aet", "MODALITY", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port),
         str(real_path), str(synth_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert to_pacs.returncode == 0, to_pacs.stderr

    # The worker decodes and writes in an analysis process pool (worker/pool.py), through Celery.
    pleura = Pleura(tmp_path, demo_bundle, orthanc, redis_server.url, sc_heatmap=True, analysis_processes=1)
    try:
        echo = subprocess.run(
            [find_tool("echoscu"), "-aec", "PLEURA", "127.0.0.1", str(pleura.port)], capture_output=True, text=True
        )
        assert echo.returncode == 0, echo.stderr
        sent = pleura.storescu(real_path, synth_path)
        assert sent.returncode == 0, sent.stderr
        _wait_for_delivery(pleura, {real.StudyInstanceUID, synth.StudyInstanceUID})

        ledger = pleura.ledger
        every_kind = {"SR", "SEG", "GSPS", "SC"}
        _check_results(orthanc, real, tmp_path, ledger, every_kind)
        results = _check_results(orthanc, synth, tmp_path, ledger, every_kind)
        assert results["SEG"].pixel_array.any(), "the synthetic pneumothorax was not segmented"

        synth_status = ledger.study_status(synth.StudyInstanceUID)
        assert synth_status["flagged"] is True, synth_status
        assert synth_status["probability"] >= 0.5
        [image] = ledger.list_instances(synth.StudyInstanceUID)
        assert image.side in ("left", "right") and image.gap_mm > 0
        real_status = ledger.study_status(real.StudyInstanceUID)
        assert real_status["model_name"] == "pleura-demo" and real_status["synthetic_model"] is True
        assert 0.0 <= real_status["probability"] <= 1.0
        assert real_status["area_cm2"] is None  # RG1 carries Pixel Spacing 0\0: no physical size

        # The processes' logs name no patient, study or instance (node/privacy.py).
        logs = pleura.node.output() + pleura.worker.output()
        for ds in (real, synth):
            for identifying in (ds.StudyInstanceUID, ds.SOPInstanceUID, ds.PatientID, str(ds.PatientName)):
                assert identifying not in logs, identifying
    finally:
        pleura.stop()


def test_embedded_broker_path_and_resend_makes_no_duplicate_work(tmp_path, demo_bundle, orthanc, synthetic_positive):
    synth_path, synth = synthetic_positive
    real_path = pydicom_data_file("RG1_J2KR.dcm")  # the same radiograph, JPEG 2000 lossless this time
    real = pydicom.dcmread(real_path, stop_before_pixels=True)
    # This PACS takes the report and the presentation state only.
    pleura = Pleura(tmp_path, demo_bundle, orthanc, broker_url=None, objects=["SR", "GSPS"])
    try:
        assert pleura.storescu(synth_path).returncode == 0
        sent = pleura.storescu(real_path, options=("-xv",))  # propose JPEG 2000 lossless
        assert sent.returncode == 0, sent.stderr
        _wait_for_delivery(pleura, {synth.StudyInstanceUID, real.StudyInstanceUID})
        ledger = pleura.ledger
        _check_results(orthanc, synth, tmp_path, ledger, {"SR", "GSPS"})
        _check_results(orthanc, real, tmp_path, ledger, {"SR", "GSPS"})
        before = len(orthanc.instances())

        dispatched = _dispatch_record(ledger, synth.StudyInstanceUID)

        # The modality sends the same image again: stored once, analysed once.
        assert pleura.storescu(synth_path).returncode == 0
        # A study sent after it and delivered: the settle loop has run many rounds since the
        # re-send, so a wrong second dispatch of the first study would be in the ledger by now.
        later, _ = synthetic_dicom(seed=4343, positive=False, size=256)
        later_path = tmp_path / "later.dcm"
        later.save_as(later_path, enforce_file_format=True)
        assert pleura.storescu(later_path).returncode == 0
        _wait_for_delivery(pleura, {later.StudyInstanceUID})
        assert _dispatch_record(ledger, synth.StudyInstanceUID) == dispatched  # not dispatched again
        assert len(ledger.list_analyses(synth.StudyInstanceUID)) == 1  # one analysis, none for the re-sent image
        status = ledger.study_status(synth.StudyInstanceUID)
        assert status["status"] == "delivered"
        assert status["instances"] == 1
        assert len(orthanc.instances()) == before + len(ledger.list_outbox(later.StudyInstanceUID))
    finally:
        pleura.stop()


def test_a_study_with_nothing_to_analyse_gets_a_report_at_the_pacs(tmp_path, demo_bundle, orthanc):
    extremity_path = pydicom_data_file("RG3_UNCR.dcm")
    extremity = pydicom.dcmread(extremity_path, stop_before_pixels=True)
    pleura = Pleura(tmp_path, demo_bundle, orthanc, broker_url=None)
    try:
        assert pleura.storescu(extremity_path).returncode == 0
        ledger = pleura.ledger

        def report_sent() -> bool:
            assert pleura.worker.alive(), pleura.logs()
            status = (ledger.study_status(extremity.StudyInstanceUID) or {}).get("status")
            outbox = ledger.list_outbox(extremity.StudyInstanceUID)
            return status == "not_analysed" and bool(outbox) and all(row.status == "sent" for row in outbox)

        wait_for(report_sent, RESULT_TIMEOUT, "the not-analysed report delivered")
        [tags] = [t for t in orthanc.instances() if t.get("StudyInstanceUID") == extremity.StudyInstanceUID]
        report = pydicom.dcmread(orthanc.download(tags["_id"], tmp_path / "report.dcm"))
        assert report.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
        comments = [item.TextValue for item in report.ContentSequence if item.ValueType == "TEXT"]
        assert any("not analysed" in c and "EXTREMITY" in c for c in comments), comments
    finally:
        pleura.stop()


def test_orthanc_pushes_a_whole_study_and_gets_the_images_results_back(tmp_path, demo_bundle, orthanc, synthetic_positive):
    """A PACS sends the whole study (the image, another vendor's report and a viewer's presentation
    state) in one association: everything is accepted, only the image is analysed, its results
    come back; the study routed back with Pleura's results in it starts nothing again."""
    image_path, image = synthetic_positive
    report, state = comprehensive_sr(image), presentation_state(image)
    others = [save_dataset(report, tmp_path / "sr.dcm"), save_dataset(state, tmp_path / "gsps.dcm")]
    to_pacs = subprocess.run(
        [find_tool("storescu"), "-aet", "MODALITY", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port),
         str(image_path), *map(str, others)],
        capture_output=True, text=True, timeout=120,
    )
    assert to_pacs.returncode == 0, to_pacs.stderr

    pleura = Pleura(tmp_path, demo_bundle, orthanc, broker_url=None)
    try:
        orthanc.add_modality("pleura", "PLEURA", pleura.port)
        orthanc.push_study("pleura", image.StudyInstanceUID)  # HTTP 500 if anything was refused
        ledger = pleura.ledger
        skipped = {i.sop_instance_uid: (i.analysis_status, i.analysis_reason)
                   for i in ledger.list_instances(image.StudyInstanceUID) if i.sop_instance_uid != image.SOPInstanceUID}
        not_an_image = "is not an image Pleura analyses"
        assert skipped == {
            report.SOPInstanceUID: ("skipped", f"Comprehensive SR Storage {not_an_image}"),
            state.SOPInstanceUID: ("skipped", f"Grayscale Softcopy Presentation State Storage {not_an_image}"),
        }
        _wait_for_delivery(pleura, {image.StudyInstanceUID})
        results = _check_results(
            orthanc, image, tmp_path, ledger, {"SR", "SEG", "GSPS", "SC"},
            others=frozenset({report.SOPInstanceUID, state.SOPInstanceUID}),
        )
        assert results["SR"].Manufacturer == "Pleura"
        delivered = ledger.study_status(image.StudyInstanceUID)
        assert (delivered["status"], delivered["reason"], delivered["instances"]) == ("delivered", None, 3)

        # Routed back with Pleura's results: acknowledged (the answers come after the ledger's
        # writes), nothing recorded, the study not re-opened.
        orthanc.push_study("pleura", image.StudyInstanceUID)
        assert ledger.study_status(image.StudyInstanceUID) == delivered
        assert len(ledger.list_instances(image.StudyInstanceUID)) == 3
        assert ledger.due_studies(0.0) == []
    finally:
        pleura.stop()
