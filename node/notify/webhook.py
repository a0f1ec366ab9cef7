"""Webhook notifications: a JSON body POSTed to an HTTP(S) endpoint, optionally signed."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from config.errors import PleuraError
from config.destinations import Webhook
from node.text import header_text

SIGNATURE_HEADER = "X-Pleura-Signature"
EVENT_HEADER = "X-Pleura-Event"


class WebhookError(PleuraError, RuntimeError):
    """The endpoint could not be reached or did not answer 2xx."""


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _header(value: Any) -> str | None:
    """Text from a DICOM header without its control characters (JSON would escape them, but the
    receiver may copy the value into HL7, a log line or a terminal)."""
    return None if value is None else header_text(value)


def webhook_body(study: dict[str, Any], event: str, *, now: datetime) -> str:
    """The JSON body: the study's identifiers for matching (no patient ID or name), the finding and
    the model. `study_ref` is the study's reference in the worklist API (/api/studies/{ref})."""
    images = study.get("images") or []
    flagged_images = [i for i in images if i.get("flagged")]
    gaps = [i["largest_gap_mm"] for i in flagged_images if i.get("largest_gap_mm") is not None]
    body = {
        "event": event,
        "sent_at": now.isoformat(),
        "study_instance_uid": _header(study["study_uid"]),
        "accession_number": _header(study.get("accession_number")),
        "study_ref": study.get("ref"),
        "flagged": event == "flagged",
        # The decision announced before for this study changed (a re-analysis, a verdict).
        "correction": bool(study.get("correction")) or event == "withdrawn",
        "finding": "pneumothorax suspected" if event == "flagged" else "pneumothorax not suspected",
        "probability": study.get("probability"),
        "area_cm2": study.get("area_cm2"),
        "area_px": study.get("area_px"),
        "side": sorted({i["side"] for i in flagged_images if i.get("side")}) or None,
        "largest_gap_mm": max(gaps) if gaps else None,
        "model": {
            "name": study.get("model_name"),
            "version": study.get("model_version"),
            "synthetic_demo": bool(study.get("synthetic_model")),
        },
        "received_at": _iso(study.get("first_received_at")),
        "analysed_at": _iso(study.get("analysed_at")),
        "feedback": (
            {"verdict": study["feedback"]["verdict"], "at": _iso(study["feedback"]["created_at"])}
            if study.get("feedback")
            else None
        ),
    }
    return json.dumps(body, sort_keys=True)


def post_webhook(webhook: Webhook, payload: str, event: str) -> str:
    """POST `payload`; returns the status line and the start of the answer, or raises WebhookError."""
    data = payload.encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "pleura", EVENT_HEADER: event}
    if webhook.secret:
        digest = hmac.new(webhook.secret.encode("utf-8"), data, hashlib.sha256).hexdigest()
        headers[SIGNATURE_HEADER] = f"sha256={digest}"
    request = urllib.request.Request(webhook.url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=webhook.timeout_seconds) as response:
            answer = response.read(2000).decode("utf-8", "replace")
            return f"HTTP {response.status} {answer}".strip()
    except urllib.error.HTTPError as exc:
        raise WebhookError(f"HTTP {exc.code} {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        raise WebhookError(f"{type(exc).__name__}: {exc}") from exc
