"""Studies: the worklist (sorted by urgency, then age), one study, its image previews, its feedback."""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse
from scipy import ndimage

from node.api.auth import Principal, current_principal, record_access, require_feedback_role
from contract.decision import reason_threshold
from node.api.context import StudyContext
from node.api.deps import get_context, get_ledger, get_previews, get_settings
from node.api.previews import PreviewError, PreviewRenderer, overlay_png, seg_mask, viewer_image
from node.api.schemas import (
    API_TO_LEDGER,
    LEDGER_TO_API,
    URGENCY_RANK,
    AnalysisOut,
    ApiStatus,
    CorrectionIn,
    DeliveryOut,
    FeedbackIn,
    FeedbackOut,
    ImageOut,
    ModelInfo,
    NotificationOut,
    ResultOut,
    StudyDetail,
    StudySummary,
    Urgency,
    errors,
)
from config.settings import Settings
from node.ledger import UNDO_SECONDS, FeedbackVerdict, Ledger, LedgerError, StudyStatus, flag_in_force
from node.storage import InstanceStore, write_durably

router = APIRouter(prefix="/api/studies", tags=["studies"], responses=errors(401))

WORKLIST_WINDOW = 5000
"""The most studies the worklist sorts and pages through: the ledger's flagged studies first, then
the most recently received (``total`` counts at most these)."""

MAX_MASK_PIXELS = 100_000_000
"""Pillow refuses to decode larger images (DecompressionBombError at twice this). The route checks
the PNG's own width and height against the image first; this is the bound for whatever else in the
API process opens an image. A radiograph has at most some 20 M pixels."""
Image.MAX_IMAGE_PIXELS = MAX_MASK_PIXELS

_PENDING = {StudyStatus.RECEIVING.value, StudyStatus.QUEUED.value}


def _feedback_out(entry: dict[str, Any] | None) -> FeedbackOut | None:
    if entry is None:
        return None
    return FeedbackOut(
        id=entry.get("id"),
        verdict=entry["verdict"],
        user=entry["user"],
        created_at=entry["created_at"],
        comment=entry["comment"],
        sop_instance_uid=entry.get("sop_instance_uid"),
        mask_key=entry.get("mask_key"),
        model_flagged=entry["flagged"],
        probability=entry["probability"],
        model_name=entry["model_name"],
        model_version=entry["model_version"],
    )


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
        feedback=_feedback_out(feedback),
        overdue=overdue,
        **extra,
    )


def _study_or_404(ledger: Ledger, ref: str) -> tuple[str, dict[str, Any]]:
    study_uid = ledger.study_for_ref(ref)
    entry = ledger.study_status(study_uid) if study_uid else None
    if study_uid is None or entry is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such study")
    history = ledger.list_feedback(study_uid)
    entry["ref"] = ref
    entry["analysis_started_at"] = ledger.analysis_started_at(study_uid)
    entry["feedback"] = history[-1] if history else None
    entry["feedback_history"] = history
    return study_uid, entry


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
    study_uid, entry = _study_or_404(ledger, ref)
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
        feedback_history=[_feedback_out(f) for f in entry["feedback_history"]],
        notifications=[notification_out(n) for n in ledger.list_notifications(study_uid)],
    )


def notification_out(row: Any, *, payload: bool = False) -> NotificationOut:
    return NotificationOut(
        id=row.id,
        event=row.event,
        channel=row.channel,
        target=row.target,
        status=row.status,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        created_at=row.created_at,
        last_attempt_at=row.last_attempt_at,
        sent_at=row.sent_at,
        last_error=row.last_error,
        response=row.response,
        payload=row.payload if payload else None,
    )


def _image_or_404(ledger: Ledger, study_uid: str, index: int) -> Any:
    instances = ledger.list_images(study_uid)
    if not 0 <= index < len(instances):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such image")
    return instances[index]


@router.get(
    "/{ref}/images/{index}/preview.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **errors(404, 422)},
    summary="A PNG of the image with the outline of the suspected pneumothorax (or the heat map)",
)
def preview(
    ref: str,
    index: int,
    request: Request,
    overlay: Literal["outline", "heatmap", "none"] = Query("outline"),
    ledger: Ledger = Depends(get_ledger),
    previews: PreviewRenderer = Depends(get_previews),
    principal: Principal = Depends(current_principal),
) -> FileResponse:
    study_uid, entry = _study_or_404(ledger, ref)
    instance = _image_or_404(ledger, study_uid, index)
    record_access(request, principal, "preview_viewed", study_uid=study_uid, ref=ref,
                  sop_instance_uid=instance.sop_instance_uid, overlay=overlay)
    results = [r for r in ledger.list_results(study_uid) if r.source_sop_instance_uid == instance.sop_instance_uid]
    try:
        if overlay == "heatmap":
            heatmap = next((r for r in results if previews.is_heatmap(r)), None)
            if heatmap is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "the analysis wrote no heat map for this image")
            path = previews.heatmap(heatmap)
        else:
            seg = next((r for r in results if r.kind == "SEG"), None) if overlay == "outline" else None
            path = previews.outline(instance, seg, synthetic=bool(entry["synthetic_model"]))
    except PreviewError as exc:
        raise HTTPException(422, str(exc)) from None
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@router.get(
    "/{ref}/images/{index}/pixels",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "headers": {
        "X-Rows": {"schema": {"type": "integer"}}, "X-Columns": {"schema": {"type": "integer"}},
        "X-Window-Center": {"schema": {"type": "number"}, "description": "the image's own window, 0..1 of the range"},
        "X-Window-Width": {"schema": {"type": "number"}}}}, **errors(404, 422)},
    summary="The image at full resolution for the viewer: little-endian uint16, row by row, bright = dense",
)
def pixels(
    ref: str,
    index: int,
    request: Request,
    ledger: Ledger = Depends(get_ledger),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> Response:
    study_uid, _ = _study_or_404(ledger, ref)
    instance = _image_or_404(ledger, study_uid, index)
    record_access(request, principal, "image_viewed", study_uid=study_uid, ref=ref,
                  sop_instance_uid=instance.sop_instance_uid)
    try:
        image = viewer_image(pydicom.dcmread(InstanceStore(settings.storage_dir).path(instance.storage_key)))
    except (OSError, pydicom.errors.InvalidDicomError, PreviewError) as exc:
        raise HTTPException(422, f"cannot read the stored image: {exc}") from None
    return Response(
        image.pixels,
        media_type="application/octet-stream",
        headers={
            "X-Rows": str(image.rows), "X-Columns": str(image.columns),
            "X-Window-Center": f"{image.window_center:.6f}", "X-Window-Width": f"{image.window_width:.6f}",
            "Cache-Control": "private, max-age=60",
        },
    )


@router.get(
    "/{ref}/images/{index}/overlay.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **errors(404, 422)},
    summary="An overlay at the image's full size: the model's outline (red) or the newest corrected outline (blue)",
)
def overlay(
    ref: str,
    index: int,
    kind: Literal["outline", "correction"] = Query("outline"),
    ledger: Ledger = Depends(get_ledger),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(current_principal),
) -> Response:
    study_uid, entry = _study_or_404(ledger, ref)
    instance = _image_or_404(ledger, study_uid, index)
    store = InstanceStore(settings.storage_dir)
    try:
        header = pydicom.dcmread(store.path(instance.storage_key), stop_before_pixels=True)
        rows, columns = int(header.Rows), int(header.Columns)
        if kind == "outline":
            seg = next((r for r in ledger.list_results(study_uid)
                        if r.kind == "SEG" and r.source_sop_instance_uid == instance.sop_instance_uid), None)
            if seg is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "the analysis outlined nothing on this image")
            mask, colour, fill = seg_mask(pydicom.dcmread(store.path(seg.storage_key)), rows, columns), (255, 40, 40), 0
        else:
            saved = [f for f in entry["feedback_history"] if f["mask_key"] and f["sop_instance_uid"] == instance.sop_instance_uid]
            if not saved:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "no corrected outline on this image")
            mask, colour, fill = np.asarray(Image.open(store.path(saved[-1]["mask_key"]))) > 0, (40, 150, 255), 90
    except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise HTTPException(422, f"cannot draw the overlay: {type(exc).__name__}") from None
    edge = max(2, round(max(rows, columns) / 400))
    return Response(overlay_png(mask, colour, fill_alpha=fill, edge=edge), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=60"})


@router.get(
    "/{ref}/feedback",
    response_model=list[FeedbackOut],
    summary="Every verdict on the study, oldest first",
    responses=errors(404),
)
def list_study_feedback(
    ref: str, ledger: Ledger = Depends(get_ledger), principal: Principal = Depends(current_principal)
) -> list[FeedbackOut]:
    _, entry = _study_or_404(ledger, ref)
    return [_feedback_out(f) for f in entry["feedback_history"]]


@router.post(
    "/{ref}/feedback",
    response_model=FeedbackOut,
    status_code=status.HTTP_201_CREATED,
    summary="Confirm, reject, mark the finding already known/treated, or correct it with an outline (role: feedback)",
    responses=errors(403, 404, 409, 413, 422, 429),
)
def give_feedback(
    ref: str,
    body: FeedbackIn,
    request: Request,
    ledger: Ledger = Depends(get_ledger),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(require_feedback_role),
) -> FeedbackOut:
    study_uid, entry = _study_or_404(ledger, ref)
    if body.verdict == FeedbackVerdict.UNDONE:
        raise HTTPException(422, "undo a verdict with POST /api/studies/{ref}/feedback/{id}/undo")
    if body.verdict == FeedbackVerdict.CORRECTED:
        if body.image_index is None or not body.mask_png:
            raise HTTPException(422, "a corrected verdict needs image_index and mask_png (the outline)")
        return _store_correction(request, ledger, settings, principal, ref, study_uid, entry, body.image_index,
                                 body.mask_png, body.comment)
    if body.image_index is not None or body.mask_png:
        raise HTTPException(422, "image_index and mask_png go only with the verdict corrected")
    if entry["analysed_at"] is None:
        raise HTTPException(status.HTTP_409_CONFLICT, "the study has not been analysed yet")
    try:
        recorded = ledger.record_feedback(
            study_uid, FeedbackVerdict(body.verdict).value, principal.name, comment=body.comment
        )
    except LedgerError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    record_access(request, principal, "feedback_given", study_uid=study_uid, ref=ref, verdict=recorded["verdict"],
                  feedback_id=recorded["id"], with_comment=bool(body.comment))
    return _feedback_out(recorded)


@router.post(
    "/{ref}/feedback/{feedback_id}/undo",
    response_model=FeedbackOut,
    status_code=status.HTTP_201_CREATED,
    summary=f"Take back one's own newest verdict within {UNDO_SECONDS} s (role: feedback)",
    responses=errors(403, 404, 409),
)
def undo_feedback(
    ref: str,
    feedback_id: int,
    request: Request,
    ledger: Ledger = Depends(get_ledger),
    principal: Principal = Depends(require_feedback_role),
) -> FeedbackOut:
    """Records a new verdict: the one before it again (a rejected flag comes back, and the RIS and
    webhooks are told, as a correction), or "undone" when there was none. Nothing is deleted."""
    study_uid, _ = _study_or_404(ledger, ref)
    try:
        recorded = ledger.undo_feedback(study_uid, feedback_id, principal.name)
    except PermissionError as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    record_access(request, principal, "feedback_undone", study_uid=study_uid, ref=ref, feedback_id=feedback_id,
                  new_feedback_id=recorded["id"], verdict=recorded["verdict"])
    return _feedback_out(recorded)


def _painted_mask(mask_png: str, rows: int, columns: int) -> np.ndarray:
    """The painted area of a PNG (base64 or data: URL), resized to the image's rows x columns.

    Painted pixels are every non-transparent, non-black pixel, and every area they close: a
    radiologist who traces the edge of the pneumothorax means the area inside it, not the ring the
    brush left (filled before resizing, so the ring's thickness in the drawing does not matter).

    The PNG's width and height are read from its header and checked against the image before a
    pixel is decoded: a few hundred kB of PNG can hold 64 M pixels (gigabytes once decoded)."""
    data = mask_png.split(",", 1)[1] if mask_png.startswith("data:") else mask_png
    try:
        picture = Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG"])
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        raise HTTPException(422, f"mask_png is not a base64 PNG: {exc}") from None
    if picture.width > columns or picture.height > rows:
        raise HTTPException(
            413,
            f"mask_png is {picture.width} x {picture.height} pixels, larger than the image ({columns} x {rows})",
        )
    try:
        picture.load()
    except (ValueError, OSError, Image.DecompressionBombError) as exc:
        raise HTTPException(422, f"mask_png is not a readable PNG: {exc}") from None
    rgba = np.asarray(picture.convert("RGBA"))
    painted = (rgba[..., 3] > 0) & (rgba[..., :3].max(axis=-1) > 0)
    if not painted.any():
        raise HTTPException(422, "the outline is empty")
    painted = ndimage.binary_fill_holes(painted)
    resized = Image.fromarray(painted.astype(np.uint8) * 255).resize((columns, rows), Image.NEAREST)
    return np.asarray(resized) > 0


def _check_mask_quota(ledger: Ledger, settings: Settings, study_uid: str, user: str) -> None:
    """Every correction stores a file that is kept (it is the record of the verdict), so one study
    and one user may store only so many: 409 for the study, 429 for the user.

    Counted from the ledger's feedback rows with a mask; two uploads at the same instant may both
    pass the last free place, which bounds the overrun to the number of simultaneous requests."""
    masks = [entry for entry in ledger.list_feedback() if entry["mask_key"]]
    if sum(entry["study_uid"] == study_uid for entry in masks) >= settings.feedback_masks_per_study:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"this study already has {settings.feedback_masks_per_study} corrected outlines "
            "(PLEURA_FEEDBACK_MASKS_PER_STUDY)",
        )
    if sum(entry["user"] == user for entry in masks) >= settings.feedback_masks_per_user:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"user {user} has stored {settings.feedback_masks_per_user} corrected outlines "
            "(PLEURA_FEEDBACK_MASKS_PER_USER)",
        )


@router.post(
    "/{ref}/images/{index}/correction",
    response_model=FeedbackOut,
    status_code=status.HTTP_201_CREATED,
    summary="Record the radiologist's own outline of the pneumothorax on one image (role: feedback)",
    responses=errors(403, 404, 409, 413, 422, 429),
)
def correct_outline(
    ref: str,
    index: int,
    body: CorrectionIn,
    request: Request,
    ledger: Ledger = Depends(get_ledger),
    settings: Settings = Depends(get_settings),
    principal: Principal = Depends(require_feedback_role),
) -> FeedbackOut:
    """The same as POST .../feedback with the verdict "corrected", image_index and mask_png."""
    study_uid, entry = _study_or_404(ledger, ref)
    return _store_correction(request, ledger, settings, principal, ref, study_uid, entry, index, body.mask_png,
                             body.comment)


def _store_correction(
    request: Request,
    ledger: Ledger,
    settings: Settings,
    principal: Principal,
    ref: str,
    study_uid: str,
    entry: dict[str, Any],
    index: int,
    mask_png: str,
    comment: str | None,
) -> FeedbackOut:
    """The mask is stored as a PNG at the image's own size under ``<storage_dir>/feedback/`` and
    the verdict "corrected" (a pneumothorax, with this outline) is recorded with who and when."""
    instance = _image_or_404(ledger, study_uid, index)
    _check_mask_quota(ledger, settings, study_uid, principal.name)
    store = InstanceStore(settings.storage_dir)
    try:
        header = pydicom.dcmread(store.path(instance.storage_key), stop_before_pixels=True)
        rows, columns = int(header.Rows), int(header.Columns)
    except (OSError, ValueError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        raise HTTPException(422, f"cannot read the stored image: {type(exc).__name__}") from None
    mask = _painted_mask(mask_png, rows, columns)
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    key = f"feedback/{ref}/{uuid.uuid4().hex}.png"
    write_durably(store.path(key), buffer.getvalue())
    recorded = ledger.record_feedback(
        study_uid,
        FeedbackVerdict.CORRECTED.value,
        principal.name,
        comment=comment,
        sop_instance_uid=instance.sop_instance_uid,
        mask_key=key,
    )
    record_access(request, principal, "feedback_given", study_uid=study_uid, ref=ref, verdict=recorded["verdict"],
                  feedback_id=recorded["id"], with_comment=bool(comment),
                  sop_instance_uid=instance.sop_instance_uid, mask_key=key)
    return _feedback_out(recorded)
