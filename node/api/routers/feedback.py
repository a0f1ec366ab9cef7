"""The feedback export for retraining: the verdict in force per study, JSON or CSV."""

from __future__ import annotations

import csv
import io
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from node.api.auth import Principal, current_principal
from node.api.deps import get_ledger
from node.ledger import Ledger

router = APIRouter(prefix="/api/feedback", tags=["feedback"])

CSV_COLUMNS = (
    "study_uid", "verdict", "study_label", "user", "created_at", "model_name", "model_version",
    "study_probability", "study_flagged", "sop_instance_uid", "series_instance_uid", "instance_key", "seg_key",
    "analysis_status", "probability", "flagged", "area_px", "mask_key", "label", "labelled_by",
)  # fmt: skip


def export_rows(exported: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per image, the study's verdict repeated on each (the CSV's shape)."""
    rows = []
    for study in exported:
        for image in study["images"]:
            rows.append(
                {
                    "study_uid": study["study_uid"],
                    "verdict": study["verdict"],
                    "study_label": study["label"],
                    "user": study["user"],
                    "created_at": study["created_at"].isoformat(),
                    "model_name": study["model_name"],
                    "model_version": study["model_version"],
                    "study_probability": study["probability"],
                    "study_flagged": study["flagged"],
                    **{key: image[key] for key in CSV_COLUMNS if key in image},
                }
            )
    return rows


def export_csv(exported: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in export_rows(exported):
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


@router.get(
    "/export",
    summary="The verdict in force per study with image and SEG storage keys, for retraining",
    responses={200: {"content": {"application/json": {}, "text/csv": {}}}},
)
def export_feedback(
    format: Literal["json", "csv"] = Query("json"),
    ledger: Ledger = Depends(get_ledger),
    principal: Principal = Depends(current_principal),
) -> Response:
    """JSON: one object per study with `label` (1 pneumothorax: confirmed, known or corrected;
    0: rejected) and its `images` (`instance_key`, `seg_key` and, for a corrected image, `mask_key`,
    relative to the storage dir; per-image `label`: 0 in a rejected study, 1 for a flagged image of
    a confirmed/known study or the corrected image, null otherwise). CSV: one row per image."""
    exported = ledger.feedback_export()
    headers = {"Content-Disposition": f'attachment; filename="pleura-feedback.{format}"'}
    if format == "csv":
        return Response(export_csv(exported), media_type="text/csv", headers=headers)
    for study in exported:
        study["created_at"] = study["created_at"].isoformat()
    return JSONResponse(exported, headers=headers)
