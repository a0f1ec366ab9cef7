"""The API's response and request models (the OpenAPI document at /openapi.json shows them)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from node.ledger import FeedbackVerdict, StudyStatus


class ApiStatus(StrEnum):
    """A study's state in the API's words: "analysing" is a queued study a worker reported taking."""

    RECEIVED = "received"
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    NOT_ANALYSED = "not analysed"
    FAILED = "failed"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery failed"


LEDGER_TO_API = {
    StudyStatus.RECEIVING.value: ApiStatus.RECEIVED,
    StudyStatus.QUEUED.value: ApiStatus.QUEUED,
    StudyStatus.DONE.value: ApiStatus.DONE,
    StudyStatus.NOT_ANALYSED.value: ApiStatus.NOT_ANALYSED,
    StudyStatus.FAILED.value: ApiStatus.FAILED,
    StudyStatus.DELIVERED.value: ApiStatus.DELIVERED,
    StudyStatus.DELIVERY_FAILED.value: ApiStatus.DELIVERY_FAILED,
}
API_TO_LEDGER = {api: ledger for ledger, api in LEDGER_TO_API.items()}
API_TO_LEDGER[ApiStatus.ANALYSING] = StudyStatus.QUEUED.value


class Urgency(StrEnum):
    """How soon a radiologist should look: the worklist's first sort key."""

    CRITICAL = "critical"  # flagged, nobody has reviewed it yet
    FLAGGED = "flagged"  # flagged, confirmed or already known/treated
    PENDING = "pending"  # not analysed yet: it may be flagged
    ROUTINE = "routine"  # analysed and not flagged, flag rejected, or not analysable


URGENCY_RANK = {Urgency.CRITICAL: 3, Urgency.FLAGGED: 2, Urgency.PENDING: 1, Urgency.ROUTINE: 0}


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong, in one line")


_ERROR_WORDS = {
    401: "not logged in: send `Authorization: Bearer <token>` or the session cookie",
    403: "logged in, but the user's role may not do this (role `feedback` needed)",
    404: "no such study or image",
    409: "the study's state does not allow it (not analysed yet, too many outlines, too late to undo)",
    413: "the request body is too large",
    422: "the request is not valid (the detail says which field)",
    429: "too many wrong tokens from this address, or too many stored outlines for this user",
}


def errors(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error codes, each a :class:`ErrorOut`."""
    return {code: {"model": ErrorOut, "description": _ERROR_WORDS[code]} for code in codes}


class ModelInfo(BaseModel):
    name: str | None
    version: str | None
    synthetic_demo: bool | None = Field(description="true: made by the SYNTHETIC DEMO model, not for clinical use")


class FeedbackOut(BaseModel):
    id: int | None = Field(None, description="the verdict's number (POST .../feedback/{id}/undo)")
    verdict: FeedbackVerdict
    user: str
    created_at: datetime
    comment: str | None = None
    sop_instance_uid: str | None = Field(None, description="corrected: the image the outline was drawn on")
    mask_key: str | None = Field(None, description="corrected: the outline (PNG mask) in the storage dir")
    model_flagged: bool | None = Field(None, description="the model's flag when the verdict was given")
    probability: float | None = None
    model_name: str | None = None
    model_version: str | None = None


class FeedbackIn(BaseModel):
    verdict: FeedbackVerdict = Field(
        description="confirmed, rejected, known (already known or treated), or corrected (with `image_index` and "
        "`mask_png`: the radiologist's outline, as POST .../images/{index}/correction takes it); "
        "undone is recorded only by POST .../feedback/{id}/undo"
    )
    comment: str | None = Field(None, max_length=2000)
    image_index: int | None = Field(None, ge=0, description="corrected: the image the outline is drawn on")
    mask_png: str | None = Field(None, max_length=20_000_000, description="corrected: as CorrectionIn.mask_png")


class CorrectionIn(BaseModel):
    mask_png: str = Field(
        max_length=20_000_000,
        description="the radiologist's outline painted over the preview, as a PNG (base64, or a data: URL); "
        "every non-transparent, non-black pixel is pneumothorax, and so is every area a painted line closes "
        "(a traced contour is filled). Any size with the image's aspect ratio.",
    )
    comment: str | None = Field(None, max_length=2000)


class StudySummary(BaseModel):
    ref: str = Field(description="the study's opaque reference, used in URLs instead of its UID")
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    status: ApiStatus
    urgency: Urgency
    flagged: bool = Field(description="the flag in force: the model's, unless a radiologist rejected it")
    model_flagged: bool | None = Field(description="what the model said; null until analysed")
    finding: str | None
    probability: float | None
    side: str | None = Field(None, description="left, right or bilateral; null until the analysis reports it")
    area_cm2: float | None = Field(description="largest flagged area in cm², when the image has a pixel spacing")
    area_px: int | None
    largest_gap_mm: float | None = Field(None, description="largest pleural gap; null until the analysis reports it")
    hemithorax_fraction: float | None = Field(
        None, description="share of the hemithorax the largest flagged area covers (0..1), when measured"
    )
    threshold: float | None = Field(None, description="the classifier threshold the decision used")
    volume_ml: float | None = Field(None, description="CT: volume of the pleural air in mL (the largest series)")
    overdue: bool = Field(False, description="no verdict yet, and older than the aging rule allows: listed first")
    patient_name: str | None = None
    patient_age: str | None = Field(None, description="as the DICOM header says it (052Y), or from the birth date")
    patient_sex: str | None = None
    study_datetime: datetime | None = Field(None, description="Study Date and Time, in the site's time zone")
    study_description: str | None = None
    modality: str | None = None
    view: str | None = Field(None, description="View Position (PA, AP, LL) of the first image")
    model: ModelInfo
    instances: int
    received_at: datetime
    last_received_at: datetime
    analysis_started_at: datetime | None = Field(None, description="when a worker last took the study")
    analysed_at: datetime | None
    delivered_at: datetime | None
    time_to_flag_seconds: float | None = Field(description="first instance received → flag raised")
    reason: str | None
    feedback: FeedbackOut | None = Field(description="the verdict in force")


class ImageOut(BaseModel):
    index: int = Field(description="position in the study, used in the preview URL")
    sop_instance_uid: str
    series_instance_uid: str
    analysis_status: str
    analysis_reason: str | None
    probability: float | None
    flagged: bool | None
    area_px: int | None
    area_cm2: float | None
    side: str | None = None
    largest_gap_mm: float | None = None
    hemithorax_fraction: float | None = None
    threshold: float | None = Field(None, description="the classifier threshold of the decision rule")
    has_outline: bool
    pixels_url: str = Field(description="the full-resolution image for the viewer (GET it for its format)")
    outline_url: str | None = Field(None, description="the model's outline as a transparent PNG at full resolution")
    correction_url: str | None = Field(None, description="the newest saved corrected outline on this image, a PNG")
    has_heatmap: bool
    preview_url: str
    heatmap_url: str | None


class ResultOut(BaseModel):
    kind: str
    sop_instance_uid: str
    source_sop_instance_uid: str | None
    created_at: datetime


class DeliveryOut(BaseModel):
    result_kind: str
    destination: str
    status: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    response: str | None = Field(
        default=None, description="a warning the destination gave with its success (C-STORE 0xBxxx, STOW-RS Warning Reason)"
    )


class NotificationOut(BaseModel):
    id: int
    event: str = Field(description="flagged, or withdrawn; for fhir the report's status: final, amended or corrected")
    channel: str = Field(description="hl7, webhook or fhir")
    target: str
    status: str = Field(description="pending, sent, failed (after max_attempts) or rejected (the receiver refused it for good: HL7 AR, FHIR HTTP 4xx; the reason in last_error)")
    attempts: int
    max_attempts: int
    created_at: datetime
    last_attempt_at: datetime | None
    sent_at: datetime | None
    last_error: str | None
    response: str | None = Field(description="the HL7 ACK or the HTTP status the target answered")
    payload: str | None = Field(None, description="exactly what was sent (only with ?payload=true)")


class AnalysisOut(BaseModel):
    """One analysis of the study; the first in ``analyses`` is the one the worklist shows."""

    model_name: str
    model_version: str
    analysed_at: datetime
    flagged: bool | None = Field(description="the model's decision for the study")
    probability: float | None
    reanalysis: bool = Field(description="asked for (pleura reanalyse, a promotion), not a study just received")
    current: bool = Field(description="the newest analysis, whose results and decision are in force")


class StudyDetail(StudySummary):
    pacs_url: str | None = Field(None, description="the study in the site's viewer (setting pacs_viewer_url)")
    images: list[ImageOut]
    analyses: list[AnalysisOut] = Field(description="every analysis of the study, newest first")
    results: list[ResultOut]
    deliveries: list[DeliveryOut]
    feedback_history: list[FeedbackOut]
    notifications: list[NotificationOut]


class SessionIn(BaseModel):
    token: str = Field(min_length=1, max_length=512)


class SessionOut(BaseModel):
    name: str
    role: str
    may_give_feedback: bool
    refresh_seconds: float
    time_zone: str = Field("UTC", description="the site's time zone: the page shows times in it")
    aging_minutes: float = Field(0.0, description="the aging rule (0: off)")
    undo_seconds: int = Field(60, description="how long a verdict can be undone by its author")
