"""One image of a study: its PNG preview (with the model's outline or heat map), its pixels at full
resolution for the viewer, and the viewer's overlays (the model's outline, the corrected one)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydicom
from PIL import Image

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse

from config.settings import Settings
from node.api.auth import Principal, current_principal, record_access
from node.api.deps import get_ledger, get_previews, get_settings
from node.api.lookup import image_or_404, study_or_404
from node.api.previews import PreviewError, PreviewRenderer, overlay_png, seg_mask, viewer_image
from node.api.schemas import errors
from node.ledger import Ledger
from node.storage import InstanceStore

router = APIRouter(prefix="/api/studies", tags=["studies"], responses=errors(401))


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
    study_uid, entry = study_or_404(ledger, ref)
    instance = image_or_404(ledger, study_uid, index)
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
    study_uid, _ = study_or_404(ledger, ref)
    instance = image_or_404(ledger, study_uid, index)
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
    study_uid, entry = study_or_404(ledger, ref)
    instance = image_or_404(ledger, study_uid, index)
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
