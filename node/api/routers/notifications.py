"""The record of the HL7 and webhook notifications: what was sent, to whom, when, and the answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from node.api.auth import Principal, current_principal
from node.api.deps import get_ledger
from node.api.lookup import notification_out
from node.api.schemas import NotificationOut
from node.ledger import Ledger

router = APIRouter(prefix="/api/notifications", tags=["notifications"])


@router.get("", response_model=list[NotificationOut], summary="Notifications, newest first")
def list_notifications(
    limit: int = Query(200, ge=1, le=2000),
    payload: bool = Query(False, description="include the exact message sent (it names the patient)"),
    ledger: Ledger = Depends(get_ledger),
    principal: Principal = Depends(current_principal),
) -> list[NotificationOut]:
    return [notification_out(row, payload=payload) for row in ledger.list_notifications(limit=limit)]
