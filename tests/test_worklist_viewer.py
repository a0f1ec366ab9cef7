"""The triage page in headless Chromium (1280 x 720 and 1600 x 1000) on a ledger filled by the real
analysis: the list beside an open study, patient context in the site's time zone, deep links and
Back, keys, the key-image viewer (zoom, window presets, overlays, full screen), verdicts that read
right with a confirmation and an undo, the outline drawing tool (fill, eraser, undo) whose saved
label `pleura dataset export-feedback` exports as the filled area, and pushed updates with an alert.

The assertions look at pixels of screenshots where the point is what a radiologist sees. With
WORKLIST_SCREENSHOTS=<dir> the screenshots for docs/worklist.md are written there."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import chromium
from node.api.server import WorklistServer
from services import free_port, wait_for
from training.synthetic import synthetic_dicom
from worklist_fixtures import RADIOLOGIST_TOKEN, receive_image, build_worklist

SHOTS = os.environ.get("WORKLIST_SCREENSHOTS")
VIEWER = "#viewer-canvas"


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_bundle):
    worklist = build_worklist(
        tmp_path_factory.mktemp("viewer"), demo_bundle,
        worklist_aging_minutes=25.0,  # the negative (30 min, unread) is overdue, the positive (20 min) not
        site_time_zone="Europe/Berlin",
        pacs_viewer_url="https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_uid}",
        worklist_refresh_seconds=300.0,  # nothing but the event stream can bring a change in time
    )
    server = WorklistServer(worklist.settings, worklist.ledger, host="127.0.0.1", port=free_port())
    server.start()
    try:
        yield worklist, server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("profile")) as context:
        context.grant_permissions(["notifications"], origin=site[1])
        yield context


def shot(page, selector: str | None = None, name: str | None = None) -> np.ndarray:
    """A screenshot (of one element) as RGB pixels; saved for the docs when asked."""
    target = page.locator(selector) if selector else page
    data = target.screenshot()
    if SHOTS and name:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        (Path(SHOTS) / name).write_bytes(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def new_page(browser, width: int, height: int):
    page = browser.new_page()
    page.set_viewport_size({"width": width, "height": height})
    return page


def red(pixels: np.ndarray) -> int:
    return int(((pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)).sum())


def blue(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 2] > pixels[..., 0] + 60) & (pixels[..., 2] > 120)


def log_in(page, url: str, hash_: str = "") -> None:
    page.goto(url + "/" + hash_)
    page.wait_for_selector("#login:not([hidden]), #app:not([hidden])")
    if page.is_visible("#login"):  # the browser's session from an earlier test may still hold
        page.fill("#token", RADIOLOGIST_TOKEN)
        page.click("#login-form button[type=submit]")
    page.wait_for_selector("#worklist-body tr")


def open_study(page, accession: str) -> str:
    row = page.locator("#worklist-body tr", has_text=accession)
    ref = row.get_attribute("data-ref")
    row.click()
    page.wait_for_function("(ref) => document.querySelector('#viewer').dataset.loaded === ref + '/0'", arg=ref)
    return ref


def test_list_beside_an_open_study_with_context_deep_links_keys_and_the_viewer(site, browser):
    worklist, url = site
    page = new_page(browser, 1600, 1000)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    log_in(page, url)
    # The aging rule: the unread negative waited longest and rises above the flagged study.
    rows = page.locator("#worklist-body tr")
    first = rows.nth(0)
    assert "ACC-NEG" in first.inner_text() and "overdue" in first.get_attribute("class")
    assert "PNEUMOTHORAX SUSPECTED" in page.locator("#worklist-body tr", has_text="Doe Jane").inner_text()
    shot(page, name="worklist-list.png")

    page.set_viewport_size({"width": 1280, "height": 720})
    ref = open_study(page, "Doe Jane")
    assert page.evaluate("location.hash") == f"#/study/{ref}"
    # The list stays usable beside the study: every visible column of the row is on screen, and
    # the image is above the fold.
    row = page.locator(f"#worklist-body tr[data-ref='{ref}']")
    for cell in row.locator("td").all():
        if cell.is_visible():
            box = cell.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 1280 * 0.5, cell.inner_text()
    canvas = page.locator(VIEWER).bounding_box()
    assert canvas["y"] + canvas["height"] <= 720 and canvas["width"] >= 400 and canvas["height"] >= 300
    for button in ("confirm", "reject"):  # the verdicts are on screen too
        verdict = page.locator(f"#feedback-buttons .verdict.{button}").bounding_box()
        assert verdict["y"] + verdict["height"] <= 720 and verdict["x"] + verdict["width"] <= 1280
    # The divider between list and study can be dragged.
    divider = page.locator("#splitter").bounding_box()
    list_width = page.locator("#worklist-pane").bounding_box()["width"]
    page.mouse.move(divider["x"] + 3, divider["y"] + 100)
    page.mouse.down()
    page.mouse.move(divider["x"] - 150, divider["y"] + 100, steps=5)
    page.mouse.up()
    assert page.locator("#worklist-pane").bounding_box()["width"] < list_width - 100
    page.evaluate("() => { localStorage.removeItem('pleura.listWidth'); document.documentElement.style.removeProperty('--list-width'); }")

    # Patient and study context, in the site's time zone; the numbers and what they are.
    assert page.inner_text("#detail-title") == "Doe Jane (52 y F)"
    study_line = page.inner_text("#detail-study")
    assert "01/01/2024, 12:00 CET" in study_line and "CHEST PA" in study_line and "ACC-POS" in study_line
    facts = page.inner_text("#detail-facts")
    probability = worklist.ledger.study_status(worklist.positive.StudyInstanceUID)["probability"]
    assert "threshold 0.5" in facts and "pleura-demo" in facts
    assert "1.00 " not in facts and ("0.99" in facts or f"{probability:.3f}"[:4] in facts)
    assert page.is_visible("text=AI result — not a diagnosis")
    assert "PNEUMOTHORAX SUSPECTED" in page.inner_text("#detail-flag")
    assert page.get_attribute("#pacs-link", "href").endswith(worklist.positive.StudyInstanceUID)

    # The viewer: the outline over the full-resolution image; zoom makes it bigger, the toggle
    # hides it, the presets change what the image looks like.
    fit = shot(page, VIEWER)
    assert red(fit) > 30
    # Zoom with the wheel about the outline: it grows on screen.
    ys, xs = np.nonzero((fit[..., 0] > 180) & (fit[..., 1] < 90) & (fit[..., 2] < 90))
    box = page.locator(VIEWER).bounding_box()
    page.mouse.move(box["x"] + xs.mean(), box["y"] + ys.mean())
    fitted = page.inner_text("#viewer-status")
    page.mouse.wheel(0, -300)
    page.wait_for_function("(s) => document.querySelector('#viewer-status').textContent !== s", arg=fitted)
    zoomed = shot(page, VIEWER)
    assert red(zoomed) > red(fit) * 1.3
    before = page.inner_text("#viewer-status")
    page.keyboard.press("=")  # and with the key
    assert page.inner_text("#viewer-status") != before
    page.select_option("#preset", "lung")
    lung = shot(page, VIEWER)
    page.select_option("#preset", "soft")
    soft = shot(page, VIEWER)
    shot(page, name="worklist-viewer.png")
    assert abs(lung.mean() - soft.mean()) > 10
    page.uncheck("#show-outline")
    assert red(shot(page, VIEWER)) < red(zoomed) / 10
    page.check("#show-outline")
    page.click("#fullscreen")
    page.wait_for_function("() => document.fullscreenElement && document.fullscreenElement.id === 'viewer'")
    page.click("#fullscreen")
    page.wait_for_function("() => !document.fullscreenElement")

    # Keys move through the list; Back goes back to the study before; a deep link opens a study.
    order = [r.get_attribute("data-ref") for r in rows.all()]
    page.keyboard.press("j")
    following = order[order.index(ref) + 1]
    page.wait_for_function("(r) => location.hash === '#/study/' + r", arg=following)
    page.go_back()
    page.wait_for_function("(r) => document.querySelector('#detail').dataset.ref === r && location.hash.endsWith(r)", arg=ref)
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail", state="hidden")
    fresh = new_page(browser, 1280, 720)
    fresh.goto(f"{url}/#/study/{ref}")
    fresh.wait_for_function("(r) => document.querySelector('#viewer').dataset.loaded === r + '/0'", arg=ref)
    fresh.close()

    # Search and the review filter.
    page.fill("#search", "jane")
    page.wait_for_function("() => document.querySelectorAll('#worklist-body tr').length === 1")
    page.fill("#search", "")
    page.wait_for_function("() => document.querySelectorAll('#worklist-body tr').length === 3")

    # The API docs are served by the node, and work under its Content-Security-Policy.
    docs = browser.new_page()
    docs.on("request", lambda request: requested.append(request.url))
    docs.goto(f"{url}/api/docs")
    docs.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
    docs.close()
    # Nothing came from elsewhere, and no URL names the study or the patient.
    assert requested and all(u.startswith(url + "/") for u in requested), [u for u in requested if not u.startswith(url)]
    for uid in (worklist.positive.StudyInstanceUID, worklist.positive.SOPInstanceUID, str(worklist.positive.PatientID)):
        assert not any(uid in u for u in requested)
    page.close()


def test_verdicts_read_right_reject_asks_and_can_be_undone(site, browser):
    worklist, url = site
    uid = worklist.positive.StudyInstanceUID
    page = new_page(browser, 1600, 1000)
    log_in(page, url)
    ref = open_study(page, "Doe Jane")
    # Confirm is the accent colour (blue), not red; Reject is neutral, not green.
    confirm = shot(page, "#feedback-buttons button.verdict.confirm")
    assert confirm[..., 2].mean() > confirm[..., 0].mean() + 40
    reject = shot(page, "#feedback-buttons button.verdict.reject")
    assert not (reject[..., 1].mean() > reject[..., 0].mean() + 30)

    page.keyboard.press("c")
    page.wait_for_function("() => document.querySelector('#detail-flag').textContent.includes('Pneumothorax confirmed')")
    assert "Confirmed by dr.house" in page.inner_text("#detail-flag")
    page.wait_for_function(
        "(r) => document.querySelector(`#worklist-body tr[data-ref='${r}'] td.review`).textContent.startsWith('Confirmed by dr.house')",
        arg=ref,
    )
    # Reject asks first; Cancel records nothing.
    page.keyboard.press("r")
    page.wait_for_selector("#reject-dialog[open]")
    page.click("#reject-no")
    page.wait_for_selector("#reject-dialog[open]", state="detached")
    assert [f["verdict"] for f in worklist.ledger.list_feedback(uid)] == ["confirmed"]
    # Cancel and "r" again at once: the first dialog's close event comes after the second dialog
    # has opened, and the second answer still counts.
    page.keyboard.press("r")
    page.wait_for_selector("#reject-dialog[open]")
    page.evaluate("""() => {
        document.querySelector('#reject-no').click();
        document.body.dispatchEvent(new KeyboardEvent('keydown', { key: 'r', bubbles: true }));
    }""")
    page.wait_for_selector("#reject-dialog[open]")
    page.click("#reject-yes")
    page.wait_for_function("() => document.querySelector('#detail-flag').textContent.includes('AI flag rejected')")
    assert "Flag rejected by dr.house" in page.inner_text("#detail-flag")
    banner = shot(page, "#detail-flag")
    assert red(banner) == 0  # a rejected flag is not shown in the alarm colour
    page.wait_for_selector("#toast:not([hidden])")
    assert "undo within" in page.inner_text("#toast")
    page.click("#toast-undo")
    page.wait_for_function("() => document.querySelector('#detail-flag').textContent.includes('Pneumothorax confirmed')")
    assert [f["verdict"] for f in worklist.ledger.list_feedback(uid)] == ["confirmed", "rejected", "confirmed"]
    page.close()


def test_a_drawn_outline_is_filled_saved_shown_and_exported_as_the_area(site, browser, tmp_path):
    from typer.testing import CliRunner

    from pleura.cli import app
    from training.rle import rle_decode

    worklist, url = site
    page = new_page(browser, 1600, 1000)
    log_in(page, url)
    open_study(page, "ACC-NEG")
    page.uncheck("#show-outline")
    page.click("#draw-start")
    box = page.locator(VIEWER).bounding_box()
    side = min(box["width"], box["height"])
    cx, cy, radius = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, side * 0.15

    def trace(x0: float, y0: float, r: float) -> None:
        page.mouse.move(x0 + r, y0)
        page.mouse.down()
        for angle in np.linspace(0, 2 * np.pi, 40)[1:]:
            page.mouse.move(x0 + r * np.cos(angle), y0 + r * np.sin(angle))
        page.mouse.up()

    def centre_is_blue() -> bool:
        pixels = shot(page, VIEWER)
        middle = pixels[int(box["height"] / 2) - 3 : int(box["height"] / 2) + 3, int(box["width"] / 2) - 3 : int(box["width"] / 2) + 3]
        return bool(blue(middle).mean() > 0.8)

    # A stroke, undone: nothing left.
    trace(cx, cy, radius)
    assert centre_is_blue()  # the traced ring is filled, not only the brush's line
    page.click("#draw-undo")
    assert not centre_is_blue()
    trace(cx, cy, radius)
    # The eraser takes a band out of the middle; undo puts it back.
    page.click("#viewer-toolbar .tool[data-tool=erase]")
    page.mouse.move(cx - radius * 1.2, cy)
    page.mouse.down()
    page.mouse.move(cx + radius * 1.2, cy, steps=10)
    page.mouse.up()
    assert not centre_is_blue()
    page.click("#draw-undo")
    assert centre_is_blue()
    shot(page, "#viewer", name="worklist-drawing.png")
    page.click("#draw-save")
    page.wait_for_function("() => document.querySelector('#feedback-status').textContent.startsWith('Saved: Outline corrected')")
    # The saved outline is shown over the image.
    page.wait_for_function("() => !document.querySelector('#viewer').classList.contains('drawing-mode')")
    wait_for(centre_is_blue, 30, "the saved outline in the viewer")

    corrected = worklist.ledger.list_feedback(worklist.negative.StudyInstanceUID)[-1]
    assert corrected["verdict"] == "corrected" and corrected["user"] == "dr.house"
    mask = np.asarray(Image.open(worklist.settings.storage_dir / corrected["mask_key"])) > 0
    assert mask.shape == (512, 512) and mask[256, 256] and mask[246:266, 246:266].all()
    assert 0.05 < mask.mean() < 0.2  # a filled disc of some 15 % of the image's side, not a ring

    # The training set made from the feedback holds the filled area.
    out = tmp_path / "feedback-set"
    result = CliRunner().invoke(app, ["dataset", "export-feedback", "--out", str(out),
                                      "--storage", str(worklist.settings.storage_dir)])
    assert result.exit_code == 0, result.output
    import csv

    rows = [[cell.strip() for cell in r] for r in csv.reader((out / "train-rle.csv").open())][1:]
    (encoded,) = [rle for image_id, rle in rows if image_id == worklist.negative.SOPInstanceUID]
    assert np.array_equal(rle_decode(encoded, 512, 512), mask)
    page.close()


def test_a_new_flagged_study_is_pushed_with_an_alert(site, browser):
    from worker.analysis import StudyAnalyser

    worklist, url = site
    page = new_page(browser, 1280, 720)
    page.add_init_script("""
        window.__notes = [];
        const Real = window.Notification;
        window.Notification = class extends Real {
          constructor(title, options) { super(title, options); window.__notes.push([title, options.body]); }
        };
        Object.defineProperty(window.Notification, 'permission', { get: () => Real.permission });
        window.Notification.requestPermission = Real.requestPermission.bind(Real);
    """)
    log_in(page, url)
    page.wait_for_function("() => document.querySelector('#live').textContent.includes('live')")
    page.check("#sound-toggle")

    # A new positive study arrives and is analysed while the page sits open.
    arrived, _ = synthetic_dicom(seed=4242, positive=True, size=512)  # flagged in test_worklist_page
    from node.storage import InstanceStore

    item = receive_image(worklist.ledger, InstanceStore(worklist.settings.storage_dir), arrived, "ACC-NEW",
                    datetime.now(timezone.utc))
    worklist.ledger.mark_queued(arrived.StudyInstanceUID)
    analyser = StudyAnalyser.from_bundle_dir(worklist.settings.storage_dir, worklist.settings.model_bundle_dir, device="cpu")
    worklist.ledger.record_analysis(analyser.analyse(arrived.StudyInstanceUID, [item]))

    page.wait_for_selector("#alert:not([hidden])", timeout=60_000)  # pushed: polling is every 300 s here
    assert "ACC-NEW" in page.inner_text("#alert-text")
    banner = shot(page, "#alert")
    assert red(banner) > banner.shape[0] * banner.shape[1] * 0.3
    notes = page.evaluate("window.__notes")
    assert notes and "ACC-NEW" in notes[0][1] and "Doe" not in notes[0][1]  # no patient name on a lock screen
    assert page.evaluate("typeof state.lastChime") == "number"
    shot(page, name="worklist-alert.png")
    page.click("#alert-open")
    page.wait_for_function("() => document.querySelector('#detail-study').textContent.includes('ACC-NEW')")
    page.close()
