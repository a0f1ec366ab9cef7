"""Worklist log-in sessions kept in the ledger (node/ledger/logins.py, node/api/auth.py): they
survive a restart of the serving process, are shared by every process on the ledger, expire after
``api_session_hours`` and end at log-out."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import update

from config.settings import load_settings
from node.api.app import create_app
from node.api.auth import SESSION_COOKIE, _digest
from node.ledger import Ledger, LoginSession, utcnow
from services import free_port, pleura_process, wait_for, write_config

READER = "reader-token-0123456789"
RADIOLOGIST = "radiologist-token-0123456789"
USERS = [{"name": "ms.reader", "role": "read", "token": READER}, {"name": "dr.house", "role": "feedback", "token": RADIOLOGIST}]


def log_in(client: TestClient, token: str = RADIOLOGIST) -> str:
    answer = client.post("/api/session", json={"token": token})
    assert answer.status_code == 200, answer.text
    return answer.cookies[SESSION_COOKIE]


def test_a_session_opened_by_one_process_is_known_to_another_on_the_same_ledger(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    settings = load_settings(storage_dir=tmp_path, api_users=USERS, database_url=url)
    with TestClient(create_app(settings, Ledger(url))) as node_api:
        cookie = log_in(node_api)
    with TestClient(create_app(settings, Ledger(url)), cookies={SESSION_COOKIE: cookie}) as worklist_api:
        assert worklist_api.get("/api/session").json()["name"] == "dr.house"
    # The ledger holds the cookie's digest, never the cookie.
    with Ledger(url).reading() as session:
        stored = session.query(LoginSession).one()
    assert stored.session_sha256 == _digest(cookie) and cookie not in stored.session_sha256


def test_a_session_ends_at_its_expiry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    settings = load_settings(storage_dir=tmp_path, api_users=USERS, database_url=url, api_session_hours=2)
    ledger = Ledger(url)
    with TestClient(create_app(settings, ledger)) as browser:
        before = utcnow()
        answer = browser.post("/api/session", json={"token": READER})
        assert f"max-age={2 * 3600}" in answer.headers["set-cookie"].lower()
        login = ledger.login(_digest(answer.cookies[SESSION_COOKIE]))
        assert login is not None
        assert timedelta(hours=2) <= login.expires_at - before < timedelta(hours=2, minutes=1)
        assert browser.get("/api/studies").status_code == 200

        with ledger._transaction() as session:  # two hours later
            session.execute(update(LoginSession).values(expires_at=utcnow() - timedelta(seconds=1)))
        assert browser.get("/api/studies").status_code == 401


def test_log_out_ends_the_session_for_every_holder_of_the_cookie(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    settings = load_settings(storage_dir=tmp_path, api_users=USERS, database_url=url)
    ledger = Ledger(url)
    with TestClient(create_app(settings, ledger)) as browser:
        cookie = log_in(browser)
        assert browser.delete("/api/session").status_code == 204
    # A copy of the cookie (another tab, a stolen one) no longer works either.
    with TestClient(create_app(settings, ledger), cookies={SESSION_COOKIE: cookie}) as other:
        assert other.get("/api/studies").status_code == 401
    assert ledger.login(_digest(cookie)) is None


def test_a_user_removed_from_the_settings_loses_their_sessions_and_a_new_role_applies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger(url)
    settings = load_settings(storage_dir=tmp_path, api_users=USERS, database_url=url)
    with TestClient(create_app(settings, ledger)) as browser:
        radiologist, reader = log_in(browser, RADIOLOGIST), log_in(browser, READER)
    demoted = [{"name": "dr.house", "role": "read", "token": RADIOLOGIST}]
    restarted = load_settings(storage_dir=tmp_path, api_users=demoted, database_url=url)
    with TestClient(create_app(restarted, ledger), cookies={SESSION_COOKIE: radiologist}) as browser:
        assert browser.get("/api/session").json()["role"] == "read"
    with TestClient(create_app(restarted, ledger), cookies={SESSION_COOKIE: reader}) as browser:
        assert browser.get("/api/session").status_code == 401


def test_a_session_survives_a_restart_of_pleura_worklist(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    storage.mkdir()
    port = free_port()
    config = write_config(tmp_path / "pleura.toml", storage_dir=storage, api_host="127.0.0.1", api_port=port)
    env = {"PLEURA_API_USERS": json.dumps(USERS)}
    base = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        try:
            return httpx.get(f"{base}/api/session", timeout=2).status_code == 401
        except httpx.HTTPError:
            return False

    first = pleura_process("worklist", config, tmp_path / "worklist-1.log", env)
    try:
        wait_for(lambda: serving() or not first.alive(), 90, "pleura worklist to serve")
        assert first.alive(), first.output()
        answer = httpx.post(f"{base}/api/session", json={"token": RADIOLOGIST}, timeout=10)
        cookie = answer.cookies[SESSION_COOKIE]
    finally:
        first.stop()
    second = pleura_process("worklist", config, tmp_path / "worklist-2.log", env)
    try:
        wait_for(lambda: serving() or not second.alive(), 90, "pleura worklist to serve again")
        again = httpx.get(f"{base}/api/session", cookies={SESSION_COOKIE: cookie}, timeout=10)
        assert again.status_code == 200 and again.json()["name"] == "dr.house"
        assert httpx.delete(f"{base}/api/session", cookies={SESSION_COOKIE: cookie}, timeout=10).status_code == 204
        assert httpx.get(f"{base}/api/session", cookies={SESSION_COOKIE: cookie}, timeout=10).status_code == 401
    finally:
        second.stop()
