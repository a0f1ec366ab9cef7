"""The radiologists' verdicts on a study: the history, a new verdict, undoing one's own, and a
corrected outline drawn on one image (stored as a mask, within a quota)."""

from __future__ import annotations

import base64
import binascii
import io
import uuid
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from fastapi import APIRouter, Depends, HTTPException, Request, status
from scipy import ndimage

from config.settings import Settings
from node.api.auth import Principal, current_principal, record_access, require_feedback_role
from node.api.deps import get_ledger, get_settings
from node.api.lookup import feedback_out, image_or_404, study_or_404
from node.api.schemas import CorrectionIn, FeedbackIn, FeedbackOut, errors
from node.ledger import UNDO_SECONDS, FeedbackVerdict, Ledger, LedgerError
from node.storage import InstanceStore, write_durably

router = APIRouter(prefix="/api/studies", tags=["studies"], responses=errors(401))

MAX_MASK_PIXELS = 100_000_000
"""Pillow refuses to decode larger images (DecompressionBombError at twice this). The route checks
the PNG's own width and height against the image first; this is the bound for whatever else in the
API process opens an image. A radiograph has at most some 20 M pixels."""
Image.MAX_IMAGE_PIXELS = MAX_MASK_PIXELS


@router.get(
    "/{ref}/feedback",
    response_model=list[FeedbackOut],
    summary="Every verdict on the study, oldest first",
    responses=errors(404),
)
def list_study_feedback(
    ref: str, ledger: Ledger = Depends(get_ledger), principal: Principal = Depends(current_principal)
) -> list[FeedbackOut]:
    _, entry = study_or_404(ledger, ref)
    return [feedback_out(f) for f in entry["feedback_history"]]


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
    study_uid, entry = study_or_404(ledger, ref)
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
    return feedback_out(recorded)


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
    study_uid, _ = study_or_404(ledger, ref)
    try:
        recorded = ledger.undo_feedback(study_uid, feedback_id, principal.name)
    except PermissionError as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    except ValueError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    record_access(request, principal, "feedback_undone", study_uid=study_uid, ref=ref, feedback_id=feedback_id,
                  new_feedback_id=recorded["id"], verdict=recorded["verdict"])
    return feedback_out(recorded)


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
    study_uid, entry = study_or_404(ledger, ref)
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
    instance = image_or_404(ledger, study_uid, index)
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
    return feedback_out(recorded)
