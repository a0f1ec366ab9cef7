"""What the study routes share: a study or one of its images by the URL's reference (404 when there
is none), and the ledger's feedback and notification rows as the API's models."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status

from node.api.schemas import FeedbackOut, NotificationOut
from node.ledger import Ledger


def study_or_404(ledger: Ledger, ref: str) -> tuple[str, dict[str, Any]]:
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


def image_or_404(ledger: Ledger, study_uid: str, index: int) -> Any:
    instances = ledger.list_images(study_uid)
    if not 0 <= index < len(instances):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such image")
    return instances[index]


def feedback_out(entry: dict[str, Any] | None) -> FeedbackOut | None:
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
