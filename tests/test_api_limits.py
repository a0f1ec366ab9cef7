"""The worklist API under abuse: huge or endless request bodies, validation errors that would echo
their input. The body-size tests run against `pleura worklist` in its own process, so its memory
can be measured from outside."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from config.settings import load_settings
from node.api.app import create_app
from node.ledger import Ledger
from services import free_port, pleura_process, port_open, wait_for, write_config
from worklist_fixtures import API_USERS

MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc (the kernel's own count)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def worklist_process(tmp_path_factory):
    """`pleura worklist` on an empty storage dir, in its own process."""
    folder = tmp_path_factory.mktemp("worklist-process")
    port = free_port()
    (folder / "storage").mkdir()
    config = write_config(folder / "worklist.toml", storage_dir=folder / "storage", api_host="127.0.0.1", api_port=port)
    process = pleura_process("worklist", config, folder / "worklist.log",
                             extra_env={"PLEURA_API_USERS": json.dumps(API_USERS)})
    try:
        wait_for(lambda: port_open(port) or not process.alive(), 120, "pleura worklist to listen")
        assert process.alive(), process.output()
        yield process, f"http://127.0.0.1:{port}"
    finally:
        process.stop()


class Endless:
    """A JSON body of `size` bytes, {"token": "xxxx…"}, made as it is sent; counts what was taken."""

    def __init__(self, size: int, chunk: int = MB) -> None:
        self.size, self.chunk, self.sent = size, chunk, 0

    def __iter__(self):
        head, tail = b'{"token": "', b'"}'
        yield head
        self.sent += len(head)
        block = b"x" * self.chunk
        while self.sent + self.chunk + len(tail) <= self.size:
            self.sent += self.chunk
            yield block
        self.sent += len(tail)
        yield tail


def test_a_400_mb_login_body_is_refused_quickly_without_the_server_growing(worklist_process):
    process, url = worklist_process
    before = rss_bytes(process.proc.pid)
    body = Endless(400 * MB)
    started = time.monotonic()
    with httpx.Client(timeout=60) as client:
        answer = client.post(f"{url}/api/session", content=iter(body), headers={"Content-Type": "application/json"})
    elapsed = time.monotonic() - started
    assert answer.status_code == 413 and "PLEURA_API_MAX_BODY_BYTES" in answer.json()["detail"]
    assert elapsed < 30, f"413 after {elapsed:.1f} s"
    assert body.sent < 64 * MB, f"the server read {body.sent / MB:.0f} MB before answering"
    assert rss_bytes(process.proc.pid) - before < 100 * MB
    assert process.alive()


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body(worklist_process):
    process, url = worklist_process
    body = Endless(400 * MB)
    with httpx.Client(timeout=60) as client:
        answer = client.post(f"{url}/api/session", content=iter(body),
                             headers={"Content-Type": "application/json", "Content-Length": str(400 * MB)})
    assert answer.status_code == 413
    assert body.sent < 64 * MB
    # Small bodies still get through to authentication.
    with httpx.Client(timeout=30) as client:
        assert client.post(f"{url}/api/session", json={"token": API_USERS[0]["token"]}).status_code == 200


def test_a_chunked_body_without_content_length_over_the_limit_gets_413(tmp_path):
    settings = load_settings(storage_dir=tmp_path, api_users=API_USERS, api_max_body_bytes=4096)
    with TestClient(create_app(settings, Ledger(settings.ledger_url))) as client:
        chunks = [b'{"token": "'] + [b"y" * 1000] * 5 + [b'"}']
        answer = client.post("/api/session", content=iter(chunks), headers={"Content-Type": "application/json"})
        assert "content-length" not in {k.lower() for k in answer.request.headers}
        assert answer.status_code == 413 and "4096" in answer.json()["detail"]
        # Under the limit, chunked too: it reaches the route (401, an unknown token).
        small = [b'{"token": "', b"y" * 100, b'"}']
        assert client.post("/api/session", content=iter(small), headers={"Content-Type": "application/json"}).status_code == 401


def test_the_correction_upload_has_its_own_larger_limit(tmp_path):
    settings = load_settings(storage_dir=tmp_path, api_users=API_USERS, api_max_body_bytes=1024,
                             api_max_upload_bytes=8192)
    upload = "/api/studies/some-ref/images/0/correction"
    with TestClient(create_app(settings, Ledger(settings.ledger_url))) as client:
        # 4 kB: too much for a log-in, fine for an upload (which then needs a token).
        assert client.post(upload, json={"mask_png": "A" * 4000}).status_code == 401
        session = client.post("/api/session", json={"token": "A" * 4000})
        assert session.status_code == 413 and "PLEURA_API_MAX_BODY_BYTES" in session.json()["detail"]
        large = client.post(upload, json={"mask_png": "A" * 10000})
        assert large.status_code == 413 and "PLEURA_API_MAX_UPLOAD_BYTES" in large.json()["detail"]


def test_a_validation_error_does_not_echo_the_submitted_value(tmp_path):
    settings = load_settings(storage_dir=tmp_path, api_users=API_USERS)
    secret = "SECRET-" + "s" * 600  # longer than a token may be
    with TestClient(create_app(settings, Ledger(settings.ledger_url))) as client:
        answer = client.post("/api/session", json={"token": secret})
        assert answer.status_code == 422
        assert "SECRET-" not in answer.text and "input" not in answer.text
        (error,) = answer.json()["detail"]
        assert error["loc"] == ["body", "token"] and "512" in error["msg"]
        garbled = client.post("/api/session", content=b'{"token": "SECRET-PART', headers={"Content-Type": "application/json"})
        assert garbled.status_code == 422 and "SECRET-PART" not in garbled.text


# --- The corrected-outline upload: the PNG's size is checked before it is decoded; quotas. ---

@pytest.fixture(scope="module")
def quota_worklist(tmp_path_factory, demo_bundle):
    from worklist_fixtures import build_worklist

    return build_worklist(
        tmp_path_factory.mktemp("quota-worklist"), demo_bundle, feedback_masks_per_study=2, feedback_masks_per_user=3
    )


def png_data(width: int, height: int, painted: bool = True) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.zeros((height, width, 4), dtype=np.uint8)
    if painted:
        pixels[height // 4: height // 2, width // 4: width // 2] = (0, 170, 255, 190)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def radiologist() -> dict[str, str]:
    from worklist_fixtures import RADIOLOGIST_TOKEN

    return {"Authorization": f"Bearer {RADIOLOGIST_TOKEN}"}


def test_a_png_larger_than_the_image_is_refused_before_it_is_decoded(quota_worklist, monkeypatch):
    from PIL import Image

    ref = quota_worklist.ledger.study_ref(quota_worklist.pending.StudyInstanceUID)
    url = f"/api/studies/{ref}/images/0/correction"
    rows, columns = int(quota_worklist.pending.Rows), int(quota_worklist.pending.Columns)
    huge = png_data(8000, 8000, painted=False)  # a few hundred kB of base64 for 64 M pixels
    assert len(huge) < 1_000_000
    wider, fitting = png_data(columns + 1, 10), png_data(columns, rows)

    def never_decoded(self, *args, **kwargs):
        raise AssertionError("the PNG was decoded")

    with TestClient(create_app(quota_worklist.settings, quota_worklist.ledger)) as client:
        monkeypatch.setattr(Image.Image, "load", never_decoded)
        monkeypatch.setattr(Image.Image, "convert", never_decoded)
        answer = client.post(url, json={"mask_png": huge}, headers=radiologist())
        assert answer.status_code == 413
        assert answer.json()["detail"] == f"mask_png is 8000 x 8000 pixels, larger than the image ({columns} x {rows})"
        assert client.post(url, json={"mask_png": wider}, headers=radiologist()).status_code == 413
        monkeypatch.undo()
        assert client.post(url, json={"mask_png": fitting}, headers=radiologist()).status_code == 201
    from node.api.routers import verdicts

    assert 0 < Image.MAX_IMAGE_PIXELS <= verdicts.MAX_MASK_PIXELS


def test_stored_outlines_have_a_quota_per_study_and_per_user(quota_worklist):
    positive = quota_worklist.ledger.study_ref(quota_worklist.positive.StudyInstanceUID)
    negative = quota_worklist.ledger.study_ref(quota_worklist.negative.StudyInstanceUID)
    mask = png_data(128, 128)
    with TestClient(create_app(quota_worklist.settings, quota_worklist.ledger)) as client:
        def correct(ref: str):
            return client.post(f"/api/studies/{ref}/images/0/correction", json={"mask_png": mask}, headers=radiologist())

        # The test before may have stored one outline (in the pending study) for this user.
        used = sum(1 for entry in quota_worklist.ledger.list_feedback() if entry["mask_key"])
        assert [correct(positive).status_code for _ in range(2)] == [201, 201]
        third = correct(positive)
        assert third.status_code == 409 and "PLEURA_FEEDBACK_MASKS_PER_STUDY" in third.json()["detail"]
        assert [correct(negative).status_code for _ in range(1 - used)] == [201] * (1 - used)
        over = correct(negative)
        assert over.status_code == 429 and "PLEURA_FEEDBACK_MASKS_PER_USER" in over.json()["detail"]
    folder = quota_worklist.settings.storage_dir / "feedback"
    assert len(list(folder.glob("*/*.png"))) == 3  # nothing stored for the refused ones


# --- Log-in: wrong tokens are counted per address, refused for a while, and audited. ---

def test_wrong_tokens_are_throttled_per_address_and_audited(tmp_path, caplog):
    from node.audit import AuditTrail
    from worklist_fixtures import RADIOLOGIST_TOKEN

    settings = load_settings(storage_dir=tmp_path, api_users=API_USERS, api_login_max_failures=5)
    app = create_app(settings, Ledger(settings.ledger_url))
    guesses = [f"guess-{n:04d}-abcdefghijklmnop" for n in range(5)]
    with TestClient(app, client=("192.0.2.7", 50000)) as attacker, TestClient(app, client=("192.0.2.8", 50000)) as user:
        for guess in guesses[:4]:
            assert attacker.post("/api/session", json={"token": guess}).status_code == 401
        assert attacker.get("/api/studies", headers={"Authorization": f"Bearer {guesses[4]}"}).status_code == 401
        # Five wrong: even the right token is refused from that address, without being checked.
        refused = attacker.post("/api/session", json={"token": RADIOLOGIST_TOKEN})
        assert refused.status_code == 429 and "PLEURA_API_LOGIN_MAX_FAILURES" in refused.json()["detail"]
        assert 0 < int(refused.headers["Retry-After"]) <= settings.api_login_window_seconds
        assert attacker.get("/api/studies", headers={"Authorization": f"Bearer {RADIOLOGIST_TOKEN}"}).status_code == 429
        # Another address is not affected.
        assert user.post("/api/session", json={"token": RADIOLOGIST_TOKEN}).status_code == 200

    events = AuditTrail(tmp_path).events()
    failed = [e for e in events if e["event"] == "api_login_failed"]
    assert [(e["client"], e["via"]) for e in failed] == [("192.0.2.7", "session")] * 4 + [("192.0.2.7", "bearer")]
    assert [e["client"] for e in events if e["event"] == "api_login_throttled"] == ["192.0.2.7"]
    (login,) = [e for e in events if e["event"] == "api_login"]
    assert login["user"] == "dr.house" and login["client"] == "192.0.2.8"
    audit_text = (tmp_path / "audit.jsonl").read_text()
    logged = caplog.text
    for token in [*guesses, RADIOLOGIST_TOKEN]:
        assert token not in audit_text and token[:10] not in audit_text and token not in logged
    assert "wrong API token from 192.0.2.7" in logged


def test_the_login_guard_forgets_failures_after_its_window():
    from node.api.auth import LoginGuard

    now = [1000.0]
    guard = LoginGuard(max_failures=3, window_seconds=60, clock=lambda: now[0])
    assert [guard.failed("a") for _ in range(3)] == [False, False, True]
    assert guard.retry_after("a") == 60 and guard.retry_after("b") == 0
    now[0] += 59.5
    assert guard.retry_after("a") == 1
    now[0] += 1
    assert guard.retry_after("a") == 0
    assert guard.failed("a") is False  # the old failures have left the window
