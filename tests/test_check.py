"""`pleura check` through the real command line, against real peers: DCMTK's storescp and the
demo's PACS stand-in (C-ECHO), an MLLP listener, a webhook receiver; and a peer that is not there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_peers import StoreSCP, free_port
from notify_peers import MllpListener, WebhookReceiver
from pleura.pacs_standin import ReceivingPACS
from services import REPO


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PLEURA_")}
    return subprocess.run(
        [sys.executable, "-m", "pleura.cli", "check", "--timeout", "5", *args],
        env={**clean, **env}, cwd=REPO, capture_output=True, text=True, timeout=180,
    )


@pytest.fixture
def peers(tmp_path: Path):
    storescp = StoreSCP(tmp_path / "storescp", ae_title="PACS")
    standin = ReceivingPACS(tmp_path / "standin", ae_title="ARCHIVE").start()
    mllp, webhook = MllpListener(), WebhookReceiver()
    try:
        yield storescp, standin, mllp, webhook
    finally:
        webhook.stop()
        mllp.stop()
        standin.stop()
        storescp.stop()


def site_env(tmp_path: Path, demo_bundle: Path, destinations: list[dict], mllp: MllpListener, webhook: WebhookReceiver) -> dict[str, str]:
    return {
        "PLEURA_STORAGE_DIR": str(tmp_path / "storage"),
        "PLEURA_MODEL_BUNDLE_DIR": str(demo_bundle),
        "PLEURA_MIN_FREE_DISK_MB": "1",
        "PLEURA_DESTINATIONS": json.dumps(destinations),
        "PLEURA_HL7_DESTINATIONS": json.dumps([{"host": "127.0.0.1", "port": mllp.port}]),
        "PLEURA_WEBHOOKS": json.dumps([{"url": webhook.url + "?token=s3cret-value"}]),
    }


def test_every_check_passes_against_real_peers(tmp_path: Path, demo_bundle: Path, peers) -> None:
    storescp, standin, mllp, webhook = peers
    destinations = [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
        {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": standin.port},
    ]
    result = run_check(site_env(tmp_path, demo_bundle, destinations, mllp, webhook))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    names = [re.split(r"\s{2,}", line)[1] for line in lines]
    assert names == ["database", "broker", "storage", "model", f"destination PACS@127.0.0.1:{storescp.port}",
                     f"destination ARCHIVE@127.0.0.1:{standin.port}", f"hl7 mllp://127.0.0.1:{mllp.port}",
                     f"webhook {webhook.url}?token=***"]
    assert all(line.startswith("ok  ") for line in lines), result.stdout
    assert "C-ECHO ok" in lines[4] and "C-ECHO ok" in lines[5]
    assert "s3cret-value" not in result.stdout + result.stderr
    assert mllp.messages == [] and webhook.requests == []  # reached, but nothing was sent

    as_json = json.loads(run_check(site_env(tmp_path, demo_bundle, destinations, mllp, webhook), "--json").stdout)
    assert as_json["ok"] is True and len(as_json["checks"]) == 8
    assert as_json["checks"][3]["name"] == "model" and as_json["checks"][3]["ok"] is True


def test_an_unreachable_destination_fails_the_check_with_its_line(tmp_path: Path, demo_bundle: Path, peers) -> None:
    storescp, _, mllp, webhook = peers
    closed = free_port()
    destinations = [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": storescp.port},
        {"ae_title": "GONE", "host": "127.0.0.1", "port": closed},
    ]
    env = site_env(tmp_path, demo_bundle, destinations, mllp, webhook)
    env["PLEURA_MIN_FREE_DISK_MB"] = str(10**9)  # more than any disk has
    result = run_check(env)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2, result.stdout
    assert failed[0].startswith("FAIL  storage") and "below min_free_disk_mb" in failed[0]
    assert f"destination GONE@127.0.0.1:{closed}" in failed[1] and "no association" in failed[1]
    assert "2 of 8 checks failed" in result.stderr
    assert "Traceback" not in result.stderr

    report = json.loads(run_check(env, "--json").stdout)
    assert report["ok"] is False
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["storage", f"destination GONE@127.0.0.1:{closed}"]
