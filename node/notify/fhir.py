"""FHIR R4 results for an electronic health record: each analysis as a ``DiagnosticReport`` with its
``Observation``s (the finding present or absent, coded in SNOMED CT; the probability; the model's
decision; the side and size), the model as a ``Device``, and the study as a logical reference to
its ``ImagingStudy`` (Study Instance UID) and order (accession number).

The resources are built and validated with ``fhir.resources`` (its R4B models: DiagnosticReport,
Observation, Device, Reference and Bundle are the same on the wire as R4's) and sent as one
transaction ``Bundle`` to the configured base URL, each entry a conditional update
(``PUT Observation?identifier=<system>|<value>``): sending it again (a retry after a lost answer)
changes nothing, and a corrected analysis updates the same resources, with status ``amended`` (a
new analysis, a re-analysis with another model) or ``corrected`` (a radiologist's verdict changed
the finding). The Bundle is built when the notification is queued and stored in the ledger's
notification outbox, so every attempt sends the same bytes.
"""

from __future__ import annotations

import uuid
from urllib.parse import quote
from datetime import datetime, timezone
from typing import Any

import requests
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from config.errors import PleuraError
from config.destinations import FhirEndpoint
from node.http_auth import AuthError, authorized_session
from node.text import header_text

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID_SYSTEM = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

PNEUMOTHORAX = {"system": SNOMED, "code": "36118008", "display": "Pneumothorax (disorder)"}
PRESENT = {"system": SNOMED, "code": "52101004", "display": "Present (qualifier value)"}
ABSENT = {"system": SNOMED, "code": "2667000", "display": "Absent (qualifier value)"}
SIDES = {
    "right": {"system": SNOMED, "code": "3341006", "display": "Right lung structure (body structure)"},
    "left": {"system": SNOMED, "code": "44029006", "display": "Left lung structure (body structure)"},
    "bilateral": {"system": SNOMED, "code": "39607008", "display": "Lung structure (body structure)"},
}
REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
DEMO_NOTE = "SYNTHETIC DEMO MODEL - not for clinical use"

RETRIED_HTTP_STATUSES = frozenset({408, 429})


class FhirError(PleuraError, RuntimeError):
    """The FHIR server could not be reached or answered an error worth retrying (5xx)."""


class FhirRejected(PleuraError, RuntimeError):
    """The FHIR server refused the Bundle for good (HTTP 4xx): retrying sends the same bytes, so
    the notification is marked rejected with the server's answer (``ack``, its OperationOutcome)."""

    def __init__(self, message: str, ack: str | None) -> None:
        super().__init__(message)
        self.ack = ack


def _uuid(system: str, value: str) -> str:
    """The same ``urn:uuid`` for the same identifier, so that the payload is reproducible."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{system}|{value}')}"


def _instant(value: Any) -> str | None:
    if not isinstance(value, datetime):
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()


def _entry(resource: Any, system: str, value: str) -> dict[str, Any]:
    kind = resource.get_resource_type()
    return {
        "fullUrl": _uuid(f"{system}/{kind}", value),
        "resource": resource,
        # A conditional update: the server finds the resource by its identifier (or creates it).
        "request": {"method": "PUT", "url": f"{kind}?identifier={quote(system, safe=':/')}|{quote(value, safe=':/.')}"},
    }


def _observation(
    code: dict[str, Any], status: str, system: str, study_uid: str, key: str, device: str | None,
    report_subject: dict[str, Any] | None, **value: Any,
) -> tuple[Observation, str]:
    identifier = f"{study_uid}/{key}"
    observation = Observation(
        identifier=[{"system": f"{system}/observation", "value": identifier}],
        status=status,
        category=[{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        code=code,
        subject=report_subject,
        device={"reference": device} if device else None,
        **value,
    )
    return observation, identifier


def build_report_bundle(study: dict[str, Any], endpoint: FhirEndpoint, status: str) -> str:
    """The transaction Bundle (JSON) of one study's analysis: `status` is ``final`` for the first,
    ``amended`` or ``corrected`` after. `study` is the notification outbox's study record (the
    ledger's ``_notification_info``: identifiers, the model, each image, the feedback in force)."""
    system = endpoint.identifier_system.rstrip("/")
    study_uid = header_text(study["study_uid"])
    accession = header_text(study["accession_number"]) if study.get("accession_number") else None
    synthetic = bool(study.get("synthetic_model"))
    entries: list[dict[str, Any]] = []
    subject = None
    if endpoint.patient_identifier_system and study.get("patient_id"):
        subject = {"type": "Patient", "identifier": {"system": endpoint.patient_identifier_system,
                                                     "value": header_text(study["patient_id"])}}

    device_url = None
    if study.get("model_name"):
        model = f"{study['model_name']}@{study.get('model_version') or ''}"
        device = Device(
            identifier=[{"system": f"{system}/device", "value": model}],
            status="active",
            manufacturer="Pleura",
            deviceName=[{"name": str(study["model_name"]), "type": "model-name"}],
            version=[{"value": str(study.get("model_version") or "unknown")}],
            type={"text": "Software that flags suspected pneumothorax on chest radiographs"},
            note=[{"text": DEMO_NOTE}] if synthetic else None,
        )
        entry = _entry(device, f"{system}/device", model)
        device_url = entry["fullUrl"]
        entries.append(entry)

    images = study.get("images") or []
    analysed = [image for image in images if image.get("probability") is not None]
    flagged = bool(study.get("flag_in_force"))
    observations: list[tuple[Observation, str]] = []
    if analysed:
        flagged_images = [image for image in analysed if image.get("flagged")]
        sides = sorted({image["side"] for image in flagged_images if image.get("side")})
        side = None if not sides else ("bilateral" if len(sides) > 1 or "bilateral" in sides else sides[0])
        finding_note = None
        if study.get("feedback"):
            finding_note = [{"text": f"radiologist's verdict: {study['feedback']['verdict']}"}]
        observations.append(_observation(
            {"coding": [PNEUMOTHORAX], "text": "Pneumothorax"}, status, system, study_uid, "finding", device_url, subject,
            valueCodeableConcept={"coding": [PRESENT if flagged else ABSENT]},
            bodySite={"coding": [SIDES[side]]} if flagged and side in SIDES else None,
            note=finding_note,
        ))
        local = f"{system}/code"
        probability = max(float(image["probability"]) for image in analysed)
        observations.append(_observation(
            {"coding": [{"system": local, "code": "probability"}], "text": "Pneumothorax probability (model)"},
            status, system, study_uid, "probability", device_url, subject,
            valueQuantity={"value": round(probability, 4), "unit": "probability", "system": UCUM, "code": "1"},
        ))
        observations.append(_observation(
            {"coding": [{"system": local, "code": "decision"}], "text": "Flagged for urgent review (model's decision)"},
            status, system, study_uid, "decision", device_url, subject,
            valueBoolean=bool(study.get("flagged")),
        ))
        area = study.get("area_cm2")
        if area is not None:
            observations.append(_observation(
                {"coding": [{"system": local, "code": "area"}], "text": "Pneumothorax area (outline, image plane)"},
                status, system, study_uid, "area", device_url, subject,
                valueQuantity={"value": round(float(area), 2), "unit": "cm2", "system": UCUM, "code": "cm2"},
            ))
        gaps = [float(image["largest_gap_mm"]) for image in flagged_images if image.get("largest_gap_mm") is not None]
        if gaps:
            observations.append(_observation(
                {"coding": [{"system": local, "code": "gap"}], "text": "Largest pleural gap"},
                status, system, study_uid, "gap", device_url, subject,
                valueQuantity={"value": round(max(gaps), 1), "unit": "mm", "system": UCUM, "code": "mm"},
            ))
    result_refs = []
    for observation, identifier in observations:
        entry = _entry(observation, f"{system}/observation", identifier)
        result_refs.append({"reference": entry["fullUrl"]})
        entries.append(entry)

    if not analysed:
        reasons = sorted({str(image["reason"]) for image in images if image.get("reason")})
        conclusion = "No image could be analysed" + (f": {'; '.join(reasons)}" if reasons else "")
    else:
        conclusion = "Pneumothorax suspected" if flagged else "Pneumothorax not suspected"
        if study.get("feedback"):
            conclusion += f" (radiologist's verdict: {study['feedback']['verdict']})"
    if synthetic:
        conclusion += f". {DEMO_NOTE}"
    report = DiagnosticReport(
        identifier=[{"system": system, "value": study_uid}],
        status=status,
        category=[{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
        code={"coding": [REPORT_CODE], "text": "Pneumothorax detection"},
        subject=subject,
        basedOn=[{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession}}] if accession else None,
        effectiveDateTime=_instant(study.get("first_received_at")),
        issued=_instant(study.get("analysed_at")),
        result=result_refs or None,
        imagingStudy=[{"type": "ImagingStudy", "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}}],
        conclusion=conclusion,
        conclusionCode=[{"coding": [PNEUMOTHORAX]}] if analysed and flagged else None,
    )
    entries.append(_entry(report, system, study_uid))
    bundle = Bundle(type="transaction", entry=entries)
    return bundle.model_dump_json(exclude_none=True)


def post_bundle(endpoint: FhirEndpoint, payload: str) -> str:
    """POST the transaction Bundle to the base URL; returns the status line and the start of the
    answer. Raises :class:`FhirRejected` for a refusal a retry cannot help (HTTP 4xx but 408/429,
    client credentials refused), :class:`FhirError` otherwise."""
    try:
        session = authorized_session(endpoint)
    except AuthError as exc:
        if exc.permanent:
            raise FhirRejected(str(exc), None) from exc
        raise FhirError(str(exc)) from exc
    try:
        response = session.post(
            endpoint.url.rstrip("/"), data=payload.encode("utf-8"), timeout=endpoint.timeout_seconds,
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        )
    except requests.RequestException as exc:
        raise FhirError(f"cannot reach {endpoint.label}: {type(exc).__name__}: {exc}") from exc
    answer = response.text[:2000]
    if response.ok:
        return f"HTTP {response.status_code} {answer}".strip()
    if 400 <= response.status_code < 500 and response.status_code not in RETRIED_HTTP_STATUSES:
        raise FhirRejected(f"{endpoint.label} refused the Bundle: HTTP {response.status_code} {response.reason}", answer)
    raise FhirError(f"{endpoint.label} answered HTTP {response.status_code} {response.reason}")
