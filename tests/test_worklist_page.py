"""The worklist page in headless Chromium against a running `pleura node` and `pleura worker`: a
study sent with DCMTK's storescu appears flagged without a reload, its preview shows, feedback
clicked in the page (verdicts and a drawn outline) is stored, and the RIS (a real MLLP listener) and a webhook receiver hear of
the flag and of its withdrawal."""

from __future__ import annotations

import hl7
import numpy as np
from PIL import Image

from browser import chromium
from node.ledger import Ledger
from services import find_tool, free_port, pleura_process, port_open, wait_for, write_config
from training.synthetic import synthetic_dicom
from worklist_fixtures import API_USERS, RADIOLOGIST_TOKEN, READER_TOKEN

RESULT_TIMEOUT = 300  # node and worker start, CPU inference of one 512 x 512 image on a busy machine


def test_a_study_sent_over_dicom_is_flagged_in_the_page_and_feedback_is_stored(tmp_path, demo_bundle, peers):
    import subprocess

    listener, receiver = peers
    dicom_port, api_port = free_port(), free_port()
    storage = tmp_path / "storage"
    config = write_config(
        tmp_path / "pleura.toml",
        ae_title="PLEURA", host="127.0.0.1", port=dicom_port, storage_dir=storage, model_bundle_dir=demo_bundle,
        device="cpu", settle_seconds=1.0, api_host="127.0.0.1", api_port=api_port, worklist_refresh_seconds=1.0,
    )
    # TOML tables for the lists of objects.
    with config.open("a") as toml:
        for user in API_USERS:
            toml.write("\n[[api_users]]\n" + "".join(f'{k} = "{v}"\n' for k, v in user.items()))
        toml.write(f'\n[[hl7_destinations]]\nhost = "127.0.0.1"\nport = {listener.port}\n')
        toml.write(f'\n[[webhooks]]\nurl = "{receiver.url}"\n')
    node = pleura_process("node", config, tmp_path / "node.log")
    worker = pleura_process("worker", config, tmp_path / "worker.log")

    def logs() -> str:
        return f"--- node ---\n{node.output()[-5000:]}\n--- worker ---\n{worker.output()[-5000:]}"

    try:
        wait_for(lambda: (port_open(dicom_port) and port_open(api_port)) or not node.alive(), 90, "the node to listen")
        assert node.alive(), logs()
        dataset, _ = synthetic_dicom(seed=4242, positive=True, size=512)
        source = tmp_path / "positive.dcm"
        dataset.save_as(source, enforce_file_format=True)

        with chromium(tmp_path / "profile") as browser:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"http://127.0.0.1:{api_port}/")
            page.fill("#token", RADIOLOGIST_TOKEN)
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#app:not([hidden])")
            assert page.inner_text("#user-name") == "dr.house"

            # The page is open before the study arrives: it must appear without a reload.
            sent = subprocess.run(
                [find_tool("storescu"), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(dicom_port), str(source)],
                capture_output=True, text=True, timeout=120,
            )
            assert sent.returncode == 0, sent.stderr
            try:
                row = page.wait_for_selector("#worklist-body tr.flagged", timeout=RESULT_TIMEOUT * 1000)
            except Exception:
                raise AssertionError(f"no flagged row in the page\n{logs()}") from None
            assert "PNEUMOTHORAX SUSPECTED" in row.inner_text() and str(dataset.AccessionNumber) in row.inner_text()
            assert row.get_attribute("data-urgency") == "critical"
            assert page.is_visible("#demo-banner")  # the demo model says so
            assert page.title() == "(1) Pleura worklist"  # one unreviewed flag, visible from another tab
            ref = row.get_attribute("data-ref")
            assert ref and dataset.StudyInstanceUID not in ref

            # Detail: the image with the outline loads in the viewer; no heat map comes from this model.
            row.click()
            page.wait_for_selector("#detail:not([hidden])")
            page.wait_for_function(
                "(r) => document.querySelector('#viewer').dataset.loaded === r + '/0'", arg=ref, timeout=120_000
            )
            assert "PNEUMOTHORAX SUSPECTED" in page.inner_text("#detail-flag")
            # The image's decision rule in words.
            assert "classifier" in page.inner_text("#detail-facts") and "threshold" in page.inner_text("#detail-facts")
            assert page.is_disabled("#show-heatmap")
            page.screenshot(path=str(tmp_path / "worklist.png"), full_page=True)

            ledger = Ledger(f"sqlite:///{storage / 'ledger.sqlite'}")
            study_uid = dataset.StudyInstanceUID
            page.click("button.verdict.confirm")
            page.wait_for_function(
                "() => document.querySelector('#feedback-status').textContent.startsWith('Saved: Confirmed')"
            )
            # The worker reported taking the study (the worklist said "analysing" meanwhile).
            wait_for(lambda: ledger.analysis_started_at(study_uid), 60, "the start of the analysis in the ledger")
            (confirmed,) = ledger.list_feedback(study_uid)
            assert confirmed["verdict"] == "confirmed" and confirmed["user"] == "dr.house"
            assert confirmed["flagged"] is True

            # The radiologist traces their own outline over the image; the area inside is stored as a mask.
            page.click("#draw-start")
            box = page.locator("#viewer-canvas").bounding_box()
            view = page.evaluate("() => state.viewer.view")  # image pixel -> canvas pixel

            def at(x: float, y: float) -> tuple[float, float]:
                return box["x"] + view["x"] + x * view["scale"], box["y"] + view["y"] + y * view["scale"]

            page.mouse.move(*at(410, 200))
            page.mouse.down()
            for angle in np.linspace(0, 2 * np.pi, 30)[1:]:
                page.mouse.move(*at(380 + 30 * np.cos(angle), 200 + 30 * np.sin(angle)))
            page.mouse.up()
            page.click("#draw-save")
            page.wait_for_function(
                "() => document.querySelector('#feedback-status').textContent.startsWith('Saved: Outline corrected')"
            )
            corrected = ledger.list_feedback(study_uid)[-1]
            assert corrected["verdict"] == "corrected" and corrected["user"] == "dr.house"
            mask = np.asarray(Image.open(storage / corrected["mask_key"])) > 0
            assert mask.shape == (512, 512) and mask[190:210, 370:390].all() and not mask[:, :300].any()

            # The RIS and the webhook heard of the flag.
            wait_for(lambda: listener.messages, 60, "the ORU^R01 at the MLLP listener")
            flagged = listener.messages[0]
            assert str(flagged.segment("OBR")[25]) == "F"
            finding = next(obx for obx in flagged.segments("OBX") if str(obx[3][0][0]) == "PTX-FLAG")
            assert str(finding[5]) == "SUSPECTED" and str(finding[8]) == "AA"
            assert next(obx for obx in flagged.segments("OBX") if str(obx[3][0][0]) == "STUDY-UID")[5][0] == study_uid
            wait_for(lambda: receiver.requests, 60, "the webhook")
            assert receiver.requests[0]["json"]["event"] == "flagged"

            # Rejecting withdraws the flag: the row is no longer flagged, the RIS is told.
            page.click("#feedback-buttons button.verdict.reject")
            page.click("#reject-yes")  # Reject asks first
            page.wait_for_function(
                "() => document.querySelector('#feedback-status').textContent.startsWith('Saved: Flag rejected')"
            )
            page.wait_for_selector(f"#worklist-body tr[data-ref='{ref}']:not(.flagged)")
            assert [f["verdict"] for f in ledger.list_feedback(study_uid)] == ["confirmed", "corrected", "rejected"]
            # Everything the page loaded came from the node (no CDN), and no URL names the study or patient.
            assert requested and all(url.startswith(f"http://127.0.0.1:{api_port}/") for url in requested), requested
            assert not any(study_uid in url or str(dataset.PatientID) in url for url in requested)
            wait_for(lambda: len(listener.messages) >= 2, 60, "the withdrawal at the MLLP listener")
            withdrawn: hl7.Message = listener.messages[1]
            assert str(withdrawn.segment("OBR")[25]) == "C"
            assert receiver.requests[-1]["json"]["event"] == "withdrawn" or wait_for(
                lambda: receiver.requests[-1]["json"]["event"] == "withdrawn", 60, "the webhook withdrawal"
            )

            # A read-only user sees the study but no feedback buttons.
            reader = browser.new_page()
            reader.context.clear_cookies()
            reader.goto(f"http://127.0.0.1:{api_port}/")
            reader.fill("#token", READER_TOKEN)
            reader.click("#login-form button[type=submit]")
            reader.click(f"#worklist-body tr[data-ref='{ref}']")
            reader.wait_for_selector("#detail:not([hidden])")
            assert reader.inner_text("#user-role") == "read-only"
            assert not reader.is_visible("#feedback-buttons")

        # No patient identifier in the node's or the worker's log.
        assert str(dataset.PatientID) not in node.output() and str(dataset.PatientID) not in worker.output()
    finally:
        worker.stop()
        node.stop()
