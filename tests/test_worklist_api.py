"""The worklist API on a ledger filled by the real worker analysis: access, sorting, filters,
detail, previews, feedback and its export."""

from __future__ import annotations

import csv
import io
import json
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from node.api.app import create_app
from worklist_fixtures import RADIOLOGIST_TOKEN, READER_TOKEN, build_worklist


@pytest.fixture(scope="module")
def worklist(tmp_path_factory, demo_bundle):
    return build_worklist(tmp_path_factory.mktemp("worklist"), demo_bundle)


@pytest.fixture(scope="module")
def client(worklist):
    with TestClient(create_app(worklist.settings, worklist.ledger)) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def refs_by_accession(client) -> dict[str, dict]:
    return {s["accession_number"]: s for s in client.get("/api/studies", headers=bearer(READER_TOKEN)).json()}


def test_every_endpoint_needs_a_token_or_a_session(client):
    assert client.get("/api/studies").status_code == 401
    assert client.get("/api/studies", headers=bearer("wrong-token-0123456789")).status_code == 401
    assert client.get("/api/feedback/export").status_code == 401
    assert client.get("/api/notifications").status_code == 401
    assert client.post("/api/session", json={"token": "nope"}).status_code == 401
    # The page itself and its assets are public; they hold no data.
    assert client.get("/").status_code == 200 and "Pleura" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200


def test_login_sets_a_session_cookie_the_page_uses(worklist):
    with TestClient(create_app(worklist.settings, worklist.ledger)) as browser:
        answer = browser.post("/api/session", json={"token": RADIOLOGIST_TOKEN})
        assert answer.status_code == 200
        assert answer.json() == {"name": "dr.house", "role": "feedback", "may_give_feedback": True, "refresh_seconds": 5.0,
                                 "time_zone": "UTC", "aging_minutes": 0.0, "undo_seconds": 60}
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/api/studies").status_code == 200
        assert browser.delete("/api/session").status_code == 204
        assert browser.get("/api/studies").status_code == 401


def test_flagged_first_then_oldest_with_api_status_words(client, worklist):
    studies = client.get("/api/studies", headers=bearer(READER_TOKEN)).json()
    assert [s["accession_number"] for s in studies] == ["ACC-POS", "ACC-PEND", "ACC-NEG"]
    positive, pending, negative = studies
    assert positive["flagged"] is True and positive["urgency"] == "critical"
    assert positive["finding"] == "pneumothorax suspected" and positive["probability"] >= 0.5
    assert positive["area_cm2"] > 0 and positive["time_to_flag_seconds"] > 0
    assert positive["model"] == {"name": "pleura-demo", "version": positive["model"]["version"], "synthetic_demo": True}
    assert positive["status"] == "done" and positive["study_instance_uid"] == worklist.positive.StudyInstanceUID
    assert positive["side"] in ("left", "right") and positive["largest_gap_mm"] > 0
    assert negative["side"] is None and negative["largest_gap_mm"] is None
    assert pending["status"] == "received" and pending["urgency"] == "pending" and pending["model_flagged"] is None
    assert negative["flagged"] is False and negative["urgency"] == "routine" and negative["time_to_flag_seconds"] is None
    # Opaque references: no UID in any URL.
    for study in studies:
        assert study["ref"] not in study["study_instance_uid"] and "." not in study["ref"]


def test_filters(client):
    headers = bearer(READER_TOKEN)
    assert [s["accession_number"] for s in client.get("/api/studies?flagged=true", headers=headers).json()] == ["ACC-POS"]
    received = client.get("/api/studies", params={"status": "received"}, headers=headers).json()
    assert [s["accession_number"] for s in received] == ["ACC-PEND"]
    both = client.get("/api/studies", params=[("status", "received"), ("status", "done")], headers=headers).json()
    assert len(both) == 3
    assert client.get("/api/studies?status=bogus", headers=headers).status_code == 422
    since = client.get("/api/studies", params={"since": refs_by_accession(client)["ACC-PEND"]["received_at"]}, headers=headers)
    assert [s["accession_number"] for s in since.json()] == ["ACC-PEND"]
    newest = client.get("/api/studies?order=newest", headers=headers).json()
    assert [s["accession_number"] for s in newest] == ["ACC-PEND", "ACC-POS", "ACC-NEG"]
    # Paging: the total of all pages in X-Total-Count.
    page = client.get("/api/studies", params={"offset": 1, "limit": 1}, headers=headers)
    assert page.headers["X-Total-Count"] == "3" and [s["accession_number"] for s in page.json()] == ["ACC-PEND"]
    assert client.get("/api/studies?offset=5", headers=headers).json() == []
    # Search (patient name, ID, accession, description) and a date range.
    assert [s["accession_number"] for s in client.get("/api/studies?q=jane", headers=headers).json()] == ["ACC-POS"]
    until = client.get("/api/studies", params={"until": refs_by_accession(client)["ACC-POS"]["received_at"]},
                       headers=headers).json()
    assert [s["accession_number"] for s in until] == ["ACC-NEG"]


def test_detail_and_preview_with_the_outline(client, worklist):
    ref = refs_by_accession(client)["ACC-POS"]["ref"]
    detail = client.get(f"/api/studies/{ref}", headers=bearer(READER_TOKEN)).json()
    assert detail["flagged"] is True
    # Patient and study context from the header; the numbers behind the decision.
    assert (detail["patient_name"], detail["patient_sex"], detail["patient_age"]) == ("Doe Jane", "F", "52 y")
    assert detail["study_datetime"].startswith("2024-01-01T12:00:00") and detail["study_description"] == "CHEST PA"
    assert detail["view"] == "PA" and detail["modality"] in ("CR", "DX")
    assert 0 < detail["threshold"] < 1 and detail["probability"] >= detail["threshold"]
    assert detail["hemithorax_fraction"] is None or 0 < detail["hemithorax_fraction"] <= 1
    assert detail["pacs_url"] is None  # no viewer configured
    (image,) = detail["images"]
    assert image["threshold"] == detail["threshold"]
    assert image["sop_instance_uid"] == worklist.positive.SOPInstanceUID
    assert image["flagged"] is True and image["has_outline"] is True and image["has_heatmap"] is False
    assert image["heatmap_url"] is None
    assert {"SEG", "SR"} <= {r["kind"] for r in detail["results"]}  # (GSPS and SC where written)

    outline = client.get(image["preview_url"], headers=bearer(READER_TOKEN))
    assert outline.status_code == 200 and outline.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(outline.content)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 20, "no outline drawn"
    plain = client.get(image["preview_url"], params={"overlay": "none"}, headers=bearer(READER_TOKEN))
    plain_pixels = np.asarray(Image.open(io.BytesIO(plain.content)).convert("RGB")).astype(int)
    plain_red = (plain_pixels[..., 0] > 200) & (plain_pixels[..., 1] < 80) & (plain_pixels[..., 2] < 80)
    assert plain_red.sum() < red.sum()
    assert client.get(image["preview_url"], params={"overlay": "heatmap"}, headers=bearer(READER_TOKEN)).status_code == 404
    assert client.get(f"/api/studies/{ref}/images/5/preview.png", headers=bearer(READER_TOKEN)).status_code == 404
    assert client.get("/api/studies/0000/images/0/preview.png", headers=bearer(READER_TOKEN)).status_code == 404


def test_feedback_needs_the_feedback_role_and_is_recorded_with_who_and_when(client, worklist):
    studies = refs_by_accession(client)
    positive, pending = studies["ACC-POS"]["ref"], studies["ACC-PEND"]["ref"]
    denied = client.post(f"/api/studies/{positive}/feedback", json={"verdict": "confirmed"}, headers=bearer(READER_TOKEN))
    assert denied.status_code == 403
    assert client.post(
        f"/api/studies/{pending}/feedback", json={"verdict": "confirmed"}, headers=bearer(RADIOLOGIST_TOKEN)
    ).status_code == 409
    assert client.post(
        f"/api/studies/{positive}/feedback", json={"verdict": "maybe"}, headers=bearer(RADIOLOGIST_TOKEN)
    ).status_code == 422

    saved = client.post(
        f"/api/studies/{positive}/feedback", json={"verdict": "known", "comment": "drain in place"},
        headers=bearer(RADIOLOGIST_TOKEN),
    )
    assert saved.status_code == 201
    assert saved.json()["user"] == "dr.house" and saved.json()["verdict"] == "known"
    listed = client.get(f"/api/studies/{positive}", headers=bearer(READER_TOKEN)).json()
    assert listed["feedback"]["verdict"] == "known" and listed["urgency"] == "flagged" and listed["flagged"] is True

    client.post(f"/api/studies/{positive}/feedback", json={"verdict": "rejected"}, headers=bearer(RADIOLOGIST_TOKEN))
    after = refs_by_accession(client)["ACC-POS"]
    assert after["flagged"] is False and after["model_flagged"] is True and after["urgency"] == "routine"
    assert client.get("/api/studies?flagged=true", headers=bearer(READER_TOKEN)).json() == []
    history = client.get(f"/api/studies/{positive}/feedback", headers=bearer(READER_TOKEN)).json()
    assert [f["verdict"] for f in history] == ["known", "rejected"]
    assert history[0]["comment"] == "drain in place" and history[0]["model_flagged"] is True

    stored = worklist.ledger.list_feedback(worklist.positive.StudyInstanceUID)
    assert [(f["verdict"], f["user"]) for f in stored] == [("known", "dr.house"), ("rejected", "dr.house")]
    assert stored[0]["created_at"] <= stored[1]["created_at"]


def test_feedback_export_for_retraining(client, worklist):
    negative = refs_by_accession(client)["ACC-NEG"]["ref"]
    client.post(f"/api/studies/{negative}/feedback", json={"verdict": "confirmed"}, headers=bearer(RADIOLOGIST_TOKEN))
    exported = client.get("/api/feedback/export", headers=bearer(READER_TOKEN)).json()
    by_study = {e["study_uid"]: e for e in exported}
    assert set(by_study) >= {worklist.negative.StudyInstanceUID}
    neg = by_study[worklist.negative.StudyInstanceUID]
    assert neg["verdict"] == "confirmed" and neg["label"] == 1 and neg["user"] == "dr.house"
    (image,) = neg["images"]
    assert image["instance_key"].startswith("instances/")
    assert (worklist.settings.storage_dir / image["instance_key"]).is_file()
    assert image["seg_key"] is None or (worklist.settings.storage_dir / image["seg_key"]).is_file()
    # The positive, rejected in the test before: its image has the SEG the model made.
    rejected = by_study[worklist.positive.StudyInstanceUID]
    assert rejected["label"] == 0 and rejected["images"][0]["label"] == 0
    assert rejected["images"][0]["seg_key"].startswith("results/")
    assert (worklist.settings.storage_dir / rejected["images"][0]["seg_key"]).is_file()

    answer = client.get("/api/feedback/export?format=csv", headers=bearer(READER_TOKEN))
    assert answer.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert {row["study_uid"] for row in rows} == set(by_study)
    assert all(row["instance_key"] for row in rows)


def test_openapi_documents_the_resources(client):
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/api/studies", "/api/studies/{ref}", "/api/studies/{ref}/images/{index}/preview.png",
                 "/api/studies/{ref}/feedback", "/api/feedback/export", "/api/notifications", "/api/session"):
        assert path in paths, path
    # The security schemes and the error answers are declared.
    assert set(document["components"]["securitySchemes"]) == {"bearer", "session"}
    assert {"bearer": []} in paths["/api/studies"]["get"]["security"]
    assert "X-Total-Count" in paths["/api/studies"]["get"]["responses"]["200"]["headers"]
    assert {"401", "404"} <= set(paths["/api/studies/{ref}"]["get"]["responses"])
    assert {"401", "403", "404", "409", "422"} <= set(paths["/api/studies/{ref}/feedback"]["post"]["responses"])
    assert "corrected" in document["components"]["schemas"]["FeedbackIn"]["properties"]["verdict"]["description"]
    # The interactive docs are served by the node itself (no CDN), under the page's CSP.
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "http" not in docs.text.replace("http-equiv", "")
    assert client.get("/api/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/api/docs/assets/swagger-ui.css").status_code == 200
    assert "script-src 'self'" in docs.headers["content-security-policy"]


def test_cli_exports_feedback_and_makes_tokens(worklist, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from pleura.cli import app

    ref = worklist.ledger.study_ref(worklist.negative.StudyInstanceUID)
    assert worklist.ledger.study_for_ref(ref) == worklist.negative.StudyInstanceUID
    worklist.ledger.record_feedback(worklist.negative.StudyInstanceUID, "rejected", "dr.cli")
    monkeypatch.delenv("PLEURA_DATABASE_URL", raising=False)
    monkeypatch.delenv("PLEURA_CONFIG", raising=False)
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(worklist.settings.storage_dir))
    out = tmp_path / "feedback.json"
    result = CliRunner().invoke(app, ["feedback-export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    exported = {e["study_uid"]: e for e in json.loads(out.read_text())}
    assert exported[worklist.negative.StudyInstanceUID]["user"] == "dr.cli"
    assert exported[worklist.negative.StudyInstanceUID]["label"] == 0
    result = CliRunner().invoke(app, ["feedback-export", "--out", str(tmp_path / "f.csv"), "--format", "csv"])
    assert result.exit_code == 0 and "dr.cli" in (tmp_path / "f.csv").read_text()

    made = json.loads(CliRunner().invoke(app, ["api-token"]).output)
    import hashlib

    assert hashlib.sha256(made["token"].encode()).hexdigest() == made["token_sha256"]


def test_heat_map_toggle_serves_a_secondary_capture_once_the_analysis_writes_one(client, worklist):
    """The current writers make no heat map; a Grad-CAM secondary capture (result kind SC) made
    from an image is what the heat-map overlay shows. Recorded here the way the analysis will."""
    from io import BytesIO

    import highdicom as hd
    from pydicom.uid import generate_uid

    from node.ledger import Result, utcnow
    from node.storage import write_durably

    source = worklist.positive
    rows, columns = int(source.Rows), int(source.Columns)
    heat = np.zeros((rows, columns, 3), dtype=np.uint8)
    heat[..., 0] = np.linspace(0, 255, columns, dtype=np.uint8)[None, :]  # a red ramp
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=heat, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=generate_uid(), series_number=99,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="Pleura",
        patient_orientation=("L", "F"),
    )
    sc.DerivationDescription = "DX image with the pleura-demo result burned in (result banner, Grad-CAM heat map)"
    buffer = BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    key = f"results/{source.StudyInstanceUID}/{sc.SOPInstanceUID}.dcm"
    write_durably(worklist.settings.storage_dir / key, buffer.getvalue())
    with worklist.ledger._transaction() as session:
        session.add(Result(sop_instance_uid=sc.SOPInstanceUID, kind="SC", sop_class_uid=sc.SOPClassUID,
                           storage_key=key, study_uid=source.StudyInstanceUID,
                           source_sop_instance_uid=source.SOPInstanceUID, created_at=utcnow()))

    ref = worklist.ledger.study_ref(source.StudyInstanceUID)
    (image,) = client.get(f"/api/studies/{ref}", headers=bearer(READER_TOKEN)).json()["images"]
    assert image["has_heatmap"] is True and image["heatmap_url"].endswith("overlay=heatmap")
    answer = client.get(image["heatmap_url"], headers=bearer(READER_TOKEN))
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(answer.content)).convert("RGB")).astype(int)
    assert picture[:, -1, 0].mean() > 200 and picture[:, 0, 0].mean() < 50


def test_a_queued_study_a_worker_took_is_analysing(client, worklist):
    pending = worklist.pending.StudyInstanceUID
    worklist.ledger.mark_queued(pending)
    headers = bearer(READER_TOKEN)
    assert refs_by_accession(client)["ACC-PEND"]["status"] == "queued"
    assert worklist.ledger.mark_analysing(pending, "task-1") is True
    assert worklist.ledger.mark_analysing("9.9.9", "task-2") is False
    study = refs_by_accession(client)["ACC-PEND"]
    assert study["status"] == "analysing" and study["analysis_started_at"] and study["urgency"] == "pending"
    assert [s["accession_number"] for s in client.get("/api/studies?status=analysing", headers=headers).json()] == [
        "ACC-PEND"
    ]
    assert client.get("/api/studies?status=queued", headers=headers).json() == []
    assert client.get(f"/api/studies/{study['ref']}", headers=headers).json()["status"] == "analysing"


def test_a_corrected_outline_is_stored_as_a_mask_and_exported(client, worklist):
    import base64

    ref = worklist.ledger.study_ref(worklist.negative.StudyInstanceUID)
    url = f"/api/studies/{ref}/images/0/correction"
    painted = np.zeros((256, 256, 4), dtype=np.uint8)
    painted[40:120, 150:200] = (0, 170, 255, 190)  # a stroke on the patient's left, in preview pixels
    buffer = io.BytesIO()
    Image.fromarray(painted, "RGBA").save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    assert client.post(url, json={"mask_png": data_url}, headers=bearer(READER_TOKEN)).status_code == 403
    empty = io.BytesIO()
    Image.new("RGBA", (256, 256)).save(empty, format="PNG")
    blank = base64.b64encode(empty.getvalue()).decode()
    assert client.post(url, json={"mask_png": blank}, headers=bearer(RADIOLOGIST_TOKEN)).status_code == 422
    assert client.post(url, json={"mask_png": "not base64!"}, headers=bearer(RADIOLOGIST_TOKEN)).status_code == 422
    assert client.post(
        f"/api/studies/{ref}/feedback", json={"verdict": "corrected"}, headers=bearer(RADIOLOGIST_TOKEN)
    ).status_code == 422

    saved = client.post(url, json={"mask_png": data_url, "comment": "missed apical"}, headers=bearer(RADIOLOGIST_TOKEN))
    assert saved.status_code == 201, saved.text
    feedback = saved.json()
    assert feedback["verdict"] == "corrected" and feedback["user"] == "dr.house"
    assert feedback["sop_instance_uid"] == worklist.negative.SOPInstanceUID
    mask = np.asarray(Image.open(worklist.settings.storage_dir / feedback["mask_key"])) > 0
    assert mask.shape == (int(worklist.negative.Rows), int(worklist.negative.Columns))
    assert mask[80:240, 300:400].all() and not mask[:70].any() and not mask[:, :290].any()

    # The model missed it; the radiologist's outline flags the study.
    study = refs_by_accession(client)["ACC-NEG"]
    assert study["flagged"] is True and study["model_flagged"] is False and study["urgency"] == "flagged"
    exported = {e["study_uid"]: e for e in client.get("/api/feedback/export", headers=bearer(READER_TOKEN)).json()}
    entry = exported[worklist.negative.StudyInstanceUID]
    assert entry["verdict"] == "corrected" and entry["label"] == 1 and entry["comment"] == "missed apical"
    (image,) = entry["images"]
    assert image["label"] == 1 and image["mask_key"] == feedback["mask_key"]


def test_only_a_secondary_capture_with_a_heat_map_counts_as_one(tmp_path):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from node.api.previews import PreviewRenderer
    from node.ledger import ResultView, utcnow

    renderer = PreviewRenderer(tmp_path)
    views = []
    for name, derivation in (("plain", "result burned in (result banner, pneumothorax outline)"),
                             ("heat", "result burned in (result banner, Grad-CAM heat map)")):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = generate_uid()
        ds.DerivationDescription = derivation
        (tmp_path / "results").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "results" / f"{name}.dcm", enforce_file_format=True)
        views.append(ResultView(ds.SOPInstanceUID, "SC", "1.2.840.10008.5.1.4.1.1.7", f"results/{name}.dcm", "1.2",
                                "1.2.3", utcnow()))
    assert [renderer.is_heatmap(view) for view in views] == [False, True]
    assert not renderer.is_heatmap(ResultView("9", "SEG", "x", "results/heat.dcm", "1.2", "1.2.3", utcnow()))


def test_study_views_previews_and_feedback_are_audited_without_uids_in_the_logs(client, worklist, caplog):
    from node.audit import AuditTrail

    trail = AuditTrail(worklist.settings.storage_dir)
    before = len(trail.events())
    ref = refs_by_accession(client)["ACC-POS"]["ref"]
    study_uid = worklist.positive.StudyInstanceUID
    with caplog.at_level(logging.DEBUG):
        detail = client.get(f"/api/studies/{ref}", headers=bearer(READER_TOKEN)).json()
        assert client.get(detail["images"][0]["preview_url"], headers=bearer(READER_TOKEN)).status_code == 200
        denied = client.post(f"/api/studies/{ref}/feedback", json={"verdict": "rejected"}, headers=bearer(READER_TOKEN))
        assert denied.status_code == 403
        given = client.post(f"/api/studies/{ref}/feedback", json={"verdict": "confirmed", "comment": "apical"},
                            headers=bearer(RADIOLOGIST_TOKEN))
        assert given.status_code == 201
    events = [e for e in trail.events()[before:] if e["event"] != "api_login"]
    assert [e["event"] for e in events] == ["study_viewed", "preview_viewed", "feedback_given"]
    viewed, previewed, feedback = events
    assert (viewed["user"], viewed["role"], viewed["study_uid"], viewed["ref"]) == ("ward.viewer", "read", study_uid, ref)
    assert viewed["client"] and viewed["time"]
    assert previewed["sop_instance_uid"] == worklist.positive.SOPInstanceUID and previewed["overlay"] == "outline"
    assert (feedback["user"], feedback["verdict"], feedback["study_uid"]) == ("dr.house", "confirmed", study_uid)
    assert feedback["feedback_id"] == worklist.ledger.list_feedback(study_uid)[-1]["id"] and feedback["with_comment"]
    assert "apical" not in json.dumps(feedback)  # the comment stays in the ledger
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert study_uid not in logged and worklist.positive.SOPInstanceUID not in logged


def _png_data_url(rgba: np.ndarray) -> str:
    import base64

    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_a_traced_contour_is_stored_as_the_area_it_closes_through_the_feedback_verdict(client, worklist):
    """A radiologist traces the edge of the pneumothorax; the label is the area inside, not the
    brush's ring. `corrected` is a verdict like the others on POST .../feedback."""
    ref = worklist.ledger.study_ref(worklist.pending.StudyInstanceUID)
    worklist.ledger.mark_queued(worklist.pending.StudyInstanceUID)
    ring = np.zeros((256, 256, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:256, :256]
    distance = np.hypot(yy - 100, xx - 170)
    ring[(distance >= 30) & (distance <= 36)] = (0, 170, 255, 190)  # a traced circle, 6 px wide
    body = {"verdict": "corrected", "image_index": 0, "mask_png": _png_data_url(ring), "comment": "traced"}
    assert client.post(f"/api/studies/{ref}/feedback", json={**body, "image_index": None},
                       headers=bearer(RADIOLOGIST_TOKEN)).status_code == 422
    assert client.post(f"/api/studies/{ref}/feedback", json={**body, "image_index": 3},
                       headers=bearer(RADIOLOGIST_TOKEN)).status_code == 404
    saved = client.post(f"/api/studies/{ref}/feedback", json=body, headers=bearer(RADIOLOGIST_TOKEN))
    assert saved.status_code == 201, saved.text
    mask = np.asarray(Image.open(worklist.settings.storage_dir / saved.json()["mask_key"])) > 0
    # 512 px image: the circle's centre (200, 340) is inside the label, outside it is not.
    assert mask[200, 340] and mask[200 - 50 : 200 + 50, 340 - 50 : 340 + 50].mean() > 0.6
    assert not mask[200, 250] and not mask[:100].any()
    # The saved outline is served for the page to show over the image, filled, in blue.
    detail = client.get(f"/api/studies/{ref}", headers=bearer(READER_TOKEN)).json()
    assert detail["feedback"]["verdict"] == "corrected" and detail["feedback"]["user"] == "dr.house"
    shown = client.get(detail["images"][0]["correction_url"], headers=bearer(READER_TOKEN))
    assert shown.status_code == 200
    overlay = np.asarray(Image.open(io.BytesIO(shown.content)))
    assert overlay.shape == (512, 512, 4) and overlay[200, 340, 3] > 0 and overlay[200, 340, 2] > 200
    assert overlay[10, 10, 3] == 0


def test_a_verdict_is_undone_within_the_minute_by_its_author_only(client, worklist):
    from datetime import timedelta

    from node.ledger import utcnow

    uid = worklist.positive.StudyInstanceUID
    ref = worklist.ledger.study_ref(uid)
    before = worklist.ledger.list_feedback(uid)
    rejected = client.post(f"/api/studies/{ref}/feedback", json={"verdict": "rejected"},
                           headers=bearer(RADIOLOGIST_TOKEN)).json()
    assert refs_by_accession(client)["ACC-POS"]["flagged"] is False
    rejected_id = worklist.ledger.list_feedback(uid)[-1]["id"]
    assert client.post(f"/api/studies/{ref}/feedback/{rejected_id}/undo",
                       headers=bearer(READER_TOKEN)).status_code == 403
    undone = client.post(f"/api/studies/{ref}/feedback/{rejected_id}/undo", headers=bearer(RADIOLOGIST_TOKEN))
    assert undone.status_code == 201, undone.text
    # The verdict before the rejection is in force again (or none), and the flag is back.
    restored = before[-1]["verdict"] if before and before[-1]["verdict"] != "undone" else "undone"
    assert undone.json()["verdict"] == restored and rejected["verdict"] == "rejected"
    assert refs_by_accession(client)["ACC-POS"]["flagged"] is True
    assert client.post(f"/api/studies/{ref}/feedback/{rejected_id}/undo",
                       headers=bearer(RADIOLOGIST_TOKEN)).status_code == 409  # no longer the newest
    # Too late: a minute after.
    client.post(f"/api/studies/{ref}/feedback", json={"verdict": "rejected"}, headers=bearer(RADIOLOGIST_TOKEN))
    late_id = worklist.ledger.list_feedback(uid)[-1]["id"]
    import pytest as _pytest

    with _pytest.raises(ValueError, match="within 60 s"):
        worklist.ledger.undo_feedback(uid, late_id, "dr.house", now=utcnow() + timedelta(seconds=61))
    # Nothing was deleted: every verdict stays in the history.
    assert [f["verdict"] for f in worklist.ledger.list_feedback(uid)][-3:] == ["rejected", restored, "rejected"]


def test_viewer_pixels_and_overlays_at_full_resolution(client, worklist):
    ref = worklist.ledger.study_ref(worklist.positive.StudyInstanceUID)
    (image,) = client.get(f"/api/studies/{ref}", headers=bearer(READER_TOKEN)).json()["images"]
    assert ref in image["pixels_url"] and worklist.positive.SOPInstanceUID not in image["pixels_url"]
    answer = client.get(image["pixels_url"], headers=bearer(READER_TOKEN))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    rows, columns = int(answer.headers["X-Rows"]), int(answer.headers["X-Columns"])
    values = np.frombuffer(answer.content, dtype="<u2").reshape(rows, columns)
    assert (rows, columns) == (512, 512) and values.min() == 0 and values.max() == 65535
    assert 0 <= float(answer.headers["X-Window-Center"]) <= 1 and float(answer.headers["X-Window-Width"]) > 0
    assert client.get(image["pixels_url"]).status_code == 401
    outline = client.get(image["outline_url"], headers=bearer(READER_TOKEN))
    rgba = np.asarray(Image.open(io.BytesIO(outline.content)))
    assert rgba.shape == (512, 512, 4) and (rgba[..., 3] == 255).sum() > 20 and (rgba[..., 3] == 0).mean() > 0.9


def test_aging_rule_lists_an_unread_study_first_and_the_pacs_link(worklist):
    from datetime import datetime, timedelta, timezone

    from node.storage import InstanceStore
    from training.synthetic import synthetic_dicom
    from worklist_fixtures import receive_image

    # A study nobody has looked at for 15 minutes (not analysed yet: pending, the lowest but one).
    late, _ = synthetic_dicom(seed=80, positive=False, size=512)
    receive_image(worklist.ledger, InstanceStore(worklist.settings.storage_dir), late, "ACC-LATE",
             datetime.now(timezone.utc) - timedelta(minutes=15))
    settings = worklist.settings.model_copy(update={
        "worklist_aging_minutes": 10.0,
        "pacs_viewer_url": "https://pacs.example.org/viewer?StudyInstanceUIDs={study_uid}&acc={accession_number}",
    })
    with TestClient(create_app(settings, worklist.ledger)) as aged:
        studies = aged.get("/api/studies", headers=bearer(READER_TOKEN)).json()
        unread = [s for s in studies if s["overdue"]]
        assert [s["accession_number"] for s in unread] == ["ACC-LATE"]
        assert studies[0] == unread[0] and studies[0]["urgency"] == "pending"  # first, whatever its score
        assert all(s["feedback"] is None or s["feedback"]["verdict"] == "undone" for s in unread)
        ref = studies[0]["ref"]
        detail = aged.get(f"/api/studies/{ref}", headers=bearer(READER_TOKEN)).json()
        assert detail["pacs_url"].startswith("https://pacs.example.org/viewer?StudyInstanceUIDs=")
        assert detail["study_instance_uid"] in detail["pacs_url"]


def test_a_ct_study_shows_the_volume_its_series_measured(tmp_path):
    """A CT series' summary carries the volume of pleural air: the list and the detail show it (the
    page lists it among the facts), and a re-analysis replaces it."""
    from datetime import datetime, timezone

    from node.ledger import Ledger
    from worklist_fixtures import API_USERS, load_settings

    settings = load_settings(storage_dir=tmp_path, api_users=API_USERS)
    ledger = Ledger(settings.ledger_url)
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    ledger.record_instance(
        sop_instance_uid=f"{series}.1", study_uid=study, series_instance_uid=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        storage_key="instances/missing.dcm", patient_id="P1", accession_number="ACC-CT",
        received_at=datetime.now(timezone.utc),
    )
    ledger.mark_queued(study)

    def record(volume: float) -> None:
        ledger.record_analysis({
            "study_uid": study, "series_instance_uid": series, "model": {"name": "ct", "version": "1"},
            "flagged": True, "results": [], "volume_ml": volume,
            "images": [{"sop_instance_uid": f"{series}.1", "status": "analysed", "probability": 0.9, "flagged": True}],
        })

    record(12.34)
    with TestClient(create_app(settings, ledger)) as ct_client:
        [listed] = ct_client.get("/api/studies", headers=bearer(READER_TOKEN)).json()
        assert listed["volume_ml"] == 12.34
        assert ct_client.get(f"/api/studies/{listed['ref']}", headers=bearer(READER_TOKEN)).json()["volume_ml"] == 12.34
        assert ledger.request_reanalysis([study]) == [study]
        ledger.mark_queued(study)
        record(3.5)
        [listed] = ct_client.get("/api/studies", headers=bearer(READER_TOKEN)).json()
        assert listed["volume_ml"] == 3.5
    ledger.close()
