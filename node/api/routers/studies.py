"""Studies: the worklist (sorted by urgency, then age, paged) and one study's detail. An image's
pixels and previews are in ``images.py``, the radiologists' verdicts and outlines in ``verdicts.py``."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from config.settings import Settings
from contract.reasons import reason_threshold
from node.api.auth import Principal, current_principal, record_access
from node.api.context import StudyContext
from node.api.deps import get_context, get_ledger, get_previews, get_settings
from node.api.lookup import feedback_out, notification_out, study_or_404
from node.api.previews import PreviewRenderer
from node.api.schemas import (
    API_TO_LEDGER,
    LEDGER_TO_API,
    URGENCY_RANK,
    AnalysisOut,
    ApiStatus,
    DeliveryOut,
    ImageOut,
    ModelInfo,
    ResultOut,
    StudyDetail,
    StudySummary,
    Urgency,
    errors,
)
from node.ledger import FeedbackVerdict, Ledger, StudyStatus, flag_in_force

router = APIRouter(prefix="/api/studies", tags=["studies"], responses=errors(401))

WORKLIST_WINDOW = 5000
"""The most studies the worklist sorts and pages through: the ledger's flagged studies first, then
the most recently received (``total`` counts at most these)."""

_PENDING = {StudyStatus.RECEIVING.value, StudyStatus.QUEUED.value}


def _in_force(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The verdict in force: the newest, unless it says an earlier one was undone (then none)."""
    feedback = entry.get("feedback")
    return None if feedback is None or feedback["verdict"] == FeedbackVerdict.UNDONE else feedback


def _urgency(entry: dict[str, Any], flagged: bool) -> Urgency:
    feedback = _in_force(entry)
    if flagged:
        return Urgency.FLAGGED if feedback else Urgency.CRITICAL
    if entry["status"] in _PENDING and entry.get("analysed_at") is None:
        return Urgency.PENDING
    return Urgency.ROUTINE


def _api_status(entry: dict[str, Any]) -> ApiStatus:
    started, queued = entry.get("analysis_started_at"), entry.get("queued_at")
    if entry["status"] == StudyStatus.QUEUED and started is not None and (queued is None or started >= queued):
        return ApiStatus.ANALYSING
    return LEDGER_TO_API.get(entry["status"], ApiStatus.RECEIVED)


def study_summary(
    entry: dict[str, Any],
    *,
    side: str | None = None,
    gap: float | None = None,
    aging_minutes: float = 0.0,
    now: datetime | None = None,
    **extra: Any,
) -> StudySummary:
    """The API's view of one of the ledger's study dicts (from :meth:`Ledger.worklist`); ``extra``
    fills the context and measurement fields (:class:`StudyContext`, the detail's images)."""
    feedback = entry.get("feedback")
    flagged = flag_in_force(entry["flagged"], feedback["verdict"] if feedback else None)
    now = now or datetime.now(timezone.utc)
    overdue = bool(
        aging_minutes
        and _in_force(entry) is None
        and (now - entry["first_received_at"]).total_seconds() >= aging_minutes * 60
    )
    analysed = entry["analysed_at"]
    if entry["flagged"] is None:
        finding = None
    elif entry["flagged"]:
        finding = "pneumothorax suspected"
    else:
        finding = "pneumothorax not suspected"
    return StudySummary(
        ref=entry["ref"],
        study_instance_uid=entry["study_uid"],
        accession_number=entry["accession_number"],
        patient_id=entry["patient_id"],
        status=_api_status(entry),
        urgency=_urgency(entry, flagged),
        flagged=flagged,
        model_flagged=entry["flagged"],
        finding=finding,
        probability=entry["probability"],
        side=side if side is not None else entry.get("side"),
        area_cm2=entry["area_cm2"],
        area_px=entry["area_px"],
        largest_gap_mm=gap if gap is not None else entry.get("largest_gap_mm"),
        volume_ml=entry.get("volume_ml"),
        model=ModelInfo(name=entry["model_name"], version=entry["model_version"], synthetic_demo=entry["synthetic_model"]),
        instances=entry["instances"],
        received_at=entry["first_received_at"],
        last_received_at=entry["last_received_at"],
        analysis_started_at=entry.get("analysis_started_at"),
        analysed_at=analysed,
        delivered_at=entry["delivered_at"],
        time_to_flag_seconds=(
            (analysed - entry["first_received_at"]).total_seconds() if entry["flagged"] and analysed else None
        ),
        reason=entry["reason"],
        feedback=feedback_out(feedback),
        overdue=overdue,
        **extra,
    )


def _sort_key(study: StudySummary) -> tuple[int, datetime]:
    """Most urgent first, then oldest; an overdue study (aging rule) counts as critical."""
    rank = URGENCY_RANK[Urgency.CRITICAL] if study.overdue else URGENCY_RANK[study.urgency]
    return (-rank, study.received_at)


def _matches(study: StudySummary, text: str) -> bool:
    fields = (study.patient_name, study.patient_id, study.accession_number, study.study_description)
    return any(text in value.lower() for value in fields if value)


@router.get(
    "",
    response_model=list[StudySummary],
    summary="The worklist: most urgent (and overdue) first, then oldest first; paged",
    responses={200: {"headers": {"X-Total-Count": {"description": "studies matching the filters, all pages",
                                                   "schema": {"type": "integer"}}}}, **errors(422)},
)
def list_studies(
    response: Response,
    flagged: bool = Query(False, description="only flagged studies (the flag in force)"),
    since: datetime | None = Query(None, description="only studies with an instance received at or after this time"),
    until: datetime | None = Query(None, description="only studies first received before this time"),
    status_: list[ApiStatus] | None = Query(None, alias="status", description="only these statuses (repeatable)"),
    reviewed: bool | None = Query(None, description="true: only studies with a verdict in force; false: only without"),
    q: str | None = Query(None, max_length=200, description="text in the patient name or ID, accession or description"),
    order: Literal["urgency", "newest"] = Query("urgency", description="urgency then age, or newest first"),
    offset: int = Query(0, ge=0, description="skip this many studies (paging; the total is in X-Total-Count)"),
    limit: int = Query(200, ge=1, le=2000),
    ledger: Ledger = Depends(get_ledger),
    settings: Settings = Depends(get_settings),
    context: StudyContext = Depends(get_context),
    principal: Principal = Depends(current_principal),
) -> list[StudySummary]:
    statuses = sorted({API_TO_LEDGER[s] for s in status_}) if status_ else None
    now = datetime.now(timezone.utc)
    if until is not None and until.tzinfo is None:
        until = until.replace(tzinfo=timezone.utc)  # as `since`: a time without a zone is UTC
    entries = ledger.worklist(flagged_only=flagged, since=since, statuses=statuses, limit=WORKLIST_WINDOW)
    studies = []
    for entry in entries:
        if until is not None and entry["first_received_at"] >= until:
            continue
        studies.append(study_summary(entry, aging_minutes=settings.worklist_aging_minutes, now=now,
                                     **_context(ledger, context, entry["study_uid"])))
    if flagged:  # the flag in force: a flag a radiologist rejected is no longer shown as flagged
        studies = [s for s in studies if s.flagged]
    if status_:  # the ledger's "queued" covers both queued and analysing
        studies = [s for s in studies if s.status in status_]
    if reviewed is not None:
        studies = [s for s in studies if (s.feedback is not None and s.feedback.verdict != "undone") == reviewed]
    if q and q.strip():
        studies = [s for s in studies if _matches(s, q.strip().lower())]
    if order == "urgency":
        studies.sort(key=_sort_key)
    else:
        studies.sort(key=lambda s: s.last_received_at, reverse=True)
    response.headers["X-Total-Count"] = str(len(studies))
    return studies[offset : offset + limit]


def _context(ledger: Ledger, context: StudyContext, study_uid: str) -> dict[str, Any]:
    images = [] if context.known(study_uid) else ledger.list_images(study_uid)
    return context.of(study_uid, images[0].storage_key if images else None)


@router.get(
    "/{ref}",
    response_model=StudyDetail,
    summary="One study: images, results, deliveries, feedback, notifications",
    responses=errors(404),
)
def get_study(
    ref: str,
    request: Request,
    ledger: Ledger = Depends(get_ledger),
    settings: Settings = Depends(get_settings),
    previews: PreviewRenderer = Depends(get_previews),
    context: StudyContext = Depends(get_context),
    principal: Principal = Depends(current_principal),
) -> StudyDetail:
    study_uid, entry = study_or_404(ledger, ref)
    record_access(request, principal, "study_viewed", study_uid=study_uid, ref=ref)
    results = ledger.list_results(study_uid)
    segs = {r.source_sop_instance_uid: r for r in results if r.kind == "SEG"}
    heatmaps = {r.source_sop_instance_uid: r for r in results if previews.is_heatmap(r)}
    corrections = {f["sop_instance_uid"] for f in entry["feedback_history"] if f["mask_key"]}
    instances = ledger.list_images(study_uid)
    images = []
    for index, instance in enumerate(instances):
        has_heatmap = instance.sop_instance_uid in heatmaps
        base = f"/api/studies/{ref}/images/{index}"
        images.append(
            ImageOut(
                index=index,
                sop_instance_uid=instance.sop_instance_uid,
                series_instance_uid=instance.series_instance_uid,
                analysis_status=instance.analysis_status,
                analysis_reason=instance.analysis_reason,
                probability=instance.probability,
                flagged=instance.flagged,
                area_px=instance.area_px,
                area_cm2=instance.area_cm2,
                side=getattr(instance, "side", None),
                largest_gap_mm=getattr(instance, "gap_mm", None),
                hemithorax_fraction=instance.hemithorax_fraction,
                threshold=reason_threshold(instance.analysis_reason),
                has_outline=instance.sop_instance_uid in segs,
                has_heatmap=has_heatmap,
                preview_url=f"{base}/preview.png",
                heatmap_url=f"{base}/preview.png?overlay=heatmap" if has_heatmap else None,
                pixels_url=f"{base}/pixels",
                outline_url=f"{base}/overlay.png?kind=outline" if instance.sop_instance_uid in segs else None,
                correction_url=(
                    f"{base}/overlay.png?kind=correction" if instance.sop_instance_uid in corrections else None
                ),
            )
        )
    flagged_images = [i for i in images if i.flagged]
    sides = sorted({i.side for i in flagged_images if i.side})
    gaps = [i.largest_gap_mm for i in flagged_images if i.largest_gap_mm is not None]
    shares = [i.hemithorax_fraction for i in flagged_images if i.hemithorax_fraction is not None]
    thresholds = [i.threshold for i in images if i.threshold is not None]
    summary = study_summary(
        entry,
        side=("bilateral" if len(sides) > 1 else sides[0]) if sides else None,
        gap=max(gaps) if gaps else None,
        aging_minutes=settings.worklist_aging_minutes,
        hemithorax_fraction=max(shares) if shares else None,
        threshold=thresholds[0] if thresholds else None,
        **context.of(study_uid, instances[0].storage_key if instances else None),
    )
    pacs_url = None
    if settings.pacs_viewer_url:
        from urllib.parse import quote

        pacs_url = settings.pacs_viewer_url.format(
            study_uid=quote(study_uid, safe=""), accession_number=quote(entry["accession_number"] or "", safe="")
        )
    return StudyDetail(
        **summary.model_dump(),
        pacs_url=pacs_url,
        images=images,
        analyses=[
            AnalysisOut(
                model_name=a.model_name,
                model_version=a.model_version,
                analysed_at=a.analysed_at,
                flagged=a.flagged,
                probability=a.probability,
                reanalysis=a.reanalysis,
                current=index == 0,
            )
            for index, a in enumerate(ledger.list_analyses(study_uid))
        ],
        results=[
            ResultOut(
                kind=r.kind,
                sop_instance_uid=r.sop_instance_uid,
                source_sop_instance_uid=r.source_sop_instance_uid,
                created_at=r.created_at,
            )
            for r in results
        ],
        deliveries=[
            DeliveryOut(
                result_kind=o.result_kind,
                destination=o.destination,
                status=o.status,
                attempts=o.attempts,
                last_error=o.last_error,
                sent_at=o.sent_at,
                response=o.response,
            )
            for o in ledger.list_outbox(study_uid)
        ],
        feedback_history=[feedback_out(f) for f in entry["feedback_history"]],
        notifications=[notification_out(n) for n in ledger.list_notifications(study_uid)],
    )
