"""Delivery of results to DICOMweb destinations by STOW-RS (PS3.18 10.5), with ``dicomweb-client``.

:func:`stow_results` is the STOW-RS user: it answers like the C-STORE SCU (one status per file,
:func:`node.export.send_results`), so that both kinds of destination go through the same outbox,
backoff and stop-on-permanent-refusal rules in :func:`node.export.deliver_outbox_entry`:

- no answer, a timeout, HTTP 5xx, 408 or 429: :class:`StowError`, tried again;
- any other HTTP 4xx: a permanent :class:`StowError` (a wrong URL or credentials,
  a refused object: a retry changes nothing until someone changes the configuration);
- an instance in the response's Failed SOP Sequence: permanent with its Failure Reason, unless the
  reason is "out of resources" (0xA7xx), which the archive may overcome;
- an instance stored with a Warning Reason: that status (0xBxxx), which the outbox records.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from config.errors import PleuraError
from config.destinations import DicomwebDestination
from node.http_auth import authorized_session

log = logging.getLogger(__name__)

RETRIED_HTTP_STATUSES = frozenset({408, 429})
"""4xx answers that mean "later", not "never"."""

STOW_WARNING = 0xB000
"""A stored instance with a warning that gives no reason code."""

FAILURE_REASONS = {
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
    0x0110: "processing failure",
    0x0122: "referenced SOP class not supported",
    0x0124: "not authorized",
    0xA770: "out of resources: the request is too large",
}
"""PS3.18 Table I.2-1 / PS3.4 B.2.3 failure reasons of a STOW-RS response, in words."""


class StowError(PleuraError, RuntimeError):
    """No usable answer to a STOW-RS request; ``permanent`` when a retry cannot help (the
    outbox then gives up at once, as for a C-STORE association rejected for good)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def describe_reason(code: int) -> str:
    """A STOW-RS Failure or Warning Reason in words."""
    if 0xB000 <= code < 0xC000:
        return "warning: stored, with a warning"
    return f"failure: {FAILURE_REASONS.get(code, 'refused')}"


def stow_client(destination: DicomwebDestination) -> DICOMwebClient:
    """A client of the destination's base URL with its authentication, CA bundle and timeout,
    and without dicomweb-client's own retries: the outbox retries, with its backoff. An OAuth2
    token that cannot be had raises :class:`~node.http_auth.AuthError` (``permanent`` too)."""
    session = authorized_session(destination)
    client = DICOMwebClient(url=destination.url.rstrip("/"), session=session, timeout=destination.timeout_seconds)
    client.set_http_retry_params(retry=False)
    return client


def _answer(response: requests.Response | None) -> Dataset:
    """The STOW response's data set (DICOM JSON), or an empty one when it has none."""
    if response is None or not response.content:
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        return Dataset()


def instance_statuses(answer: Dataset, sop_instance_uids: list[str]) -> list[int]:
    """One status per instance from a STOW response: its Failure Reason, its Warning Reason, or
    success (an instance the response does not name was stored: some archives answer briefly)."""
    statuses = {uid: 0x0000 for uid in sop_instance_uids}
    for item in answer.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        warning = item.get("WarningReason")
        if uid in statuses and warning is not None:
            statuses[uid] = int(warning) or STOW_WARNING
    top_warning = answer.get("WarningReason")  # some archives put it beside the sequences
    if top_warning is not None:
        for uid, status in statuses.items():
            statuses[uid] = status or int(top_warning) or STOW_WARNING
    for item in answer.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if uid in statuses:
            statuses[uid] = int(item.get("FailureReason", 0x0110)) or 0x0110
    return [statuses[uid] for uid in sop_instance_uids]


def stow_results(
    destination: DicomwebDestination, calling_ae: str, paths: list[Path], tls: ssl.SSLContext | None = None
) -> list[int]:
    """STOW-RS each file to `destination` in one request; returns one status per file (0x0000,
    a warning 0xBxxx, or a failure reason). `calling_ae` and `tls` are the C-STORE sender's
    arguments and unused: the session authenticates, and its CA bundle checks the server.

    Raises :class:`StowError` (``permanent`` for a refusal a retry cannot help) when the request
    gets no usable answer.
    """
    if not paths:
        return []
    datasets = [dcmread(path) for path in paths]
    uids = [str(dataset.SOPInstanceUID) for dataset in datasets]
    client = stow_client(destination)
    try:
        answer = client.store_instances(datasets)
    except requests.HTTPError as exc:
        response = exc.response
        code = response.status_code if response is not None else 0
        failed = _answer(response)
        if code == 409 or failed.get("FailedSOPSequence"):
            statuses = instance_statuses(failed, uids)
            if any(status >= 0xC000 or status < 0xB000 for status in statuses if status):
                return statuses  # the per-instance reasons say more than the HTTP status
        permanent = 400 <= code < 500 and code not in RETRIED_HTTP_STATUSES
        raise StowError(
            f"{destination.label} answered HTTP {code} {response.reason if response is not None else ''}".strip(),
            permanent=permanent,
        ) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise StowError(f"cannot reach {destination.label}: {type(exc).__name__}") from exc
    except requests.RequestException as exc:
        raise StowError(f"STOW-RS to {destination.label} failed: {type(exc).__name__}: {exc}") from exc
    return instance_statuses(answer, uids)


def is_permanent_reason(status: int) -> bool:
    """A STOW-RS Failure Reason is final unless it says the archive is out of resources."""
    return (status & 0xFF00) != 0xA700
