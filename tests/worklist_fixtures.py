"""A storage directory and ledger with analysed studies, made by the real worker analysis (demo
model on CPU), for the worklist API, page and notification tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom

from config.settings import Settings, load_settings
from node.ledger import Ledger
from node.storage import InstanceStore
from training.synthetic import synthetic_dicom

READER_TOKEN = "reader-token-0123456789"
RADIOLOGIST_TOKEN = "radiologist-token-0123456789"
API_USERS = [
    {"name": "ward.viewer", "role": "read", "token": READER_TOKEN},
    {"name": "dr.house", "role": "feedback", "token": RADIOLOGIST_TOKEN},
]


@dataclass
class Worklist:
    settings: Settings
    ledger: Ledger
    positive: pydicom.Dataset
    negative: pydicom.Dataset
    pending: pydicom.Dataset


def receive_image(ledger: Ledger, store: InstanceStore, ds: pydicom.Dataset, accession: str, at: datetime) -> dict:
    """Store ``ds`` (with ``accession``) and record it as the node does; its analysis task's message."""
    ds.AccessionNumber = accession
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    key = store.write_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, buffer.getvalue())
    ledger.record_instance(
        sop_instance_uid=ds.SOPInstanceUID,
        study_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        storage_key=key,
        patient_id=str(ds.PatientID),
        accession_number=accession,
        received_at=at,
    )
    return {"sop_instance_uid": ds.SOPInstanceUID, "key": key}


def build_worklist(storage: Path, bundle: Path, **settings_overrides) -> Worklist:
    """Three studies: a flagged positive and a negative (both analysed) and one still pending."""
    from worker.analysis import StudyAnalyser

    storage.mkdir(parents=True, exist_ok=True)
    settings = load_settings(storage_dir=storage, api_users=API_USERS, model_bundle_dir=bundle, **settings_overrides)
    ledger = Ledger(settings.ledger_url)
    store = InstanceStore(storage)
    analyser = StudyAnalyser.from_bundle_dir(storage, bundle, device="cpu")
    now = datetime.now(timezone.utc)
    positive, _ = synthetic_dicom(seed=77, positive=True, size=512)
    negative, _ = synthetic_dicom(seed=78, positive=False, size=512)
    pending, _ = synthetic_dicom(seed=79, positive=True, size=512)
    # Patient context the page shows (the header's own words).
    positive.PatientName, positive.PatientSex, positive.PatientAge = "Doe^Jane", "F", "052Y"
    positive.StudyDescription, positive.StudyDate, positive.StudyTime = "CHEST PA", "20240101", "120000"
    # The negative arrived first, the positive later: urgency must beat age.
    for ds, accession, age in ((negative, "ACC-NEG", 30), (positive, "ACC-POS", 20)):
        item = receive_image(ledger, store, ds, accession, now - timedelta(minutes=age))
        ledger.mark_queued(ds.StudyInstanceUID)
        ledger.record_analysis(analyser.analyse(ds.StudyInstanceUID, [item]))
    receive_image(ledger, store, pending, "ACC-PEND", now - timedelta(minutes=1))
    return Worklist(settings, ledger, positive, negative, pending)
