"""Radiologists' feedback and the labels of Segmentations sent back, and the feedback export
retraining reads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from node.ledger.schema import (
    ERROR_TEXT_LIMIT,
    AnalysisStatus,
    Feedback,
    FeedbackVerdict,
    Instance,
    LedgerError,
    Result,
    UNDO_SECONDS,
    SegLabel,
    Study,
    as_utc,
    utcnow,
)
from node.ledger.sessions import LedgerSessions
from node.ledger.views import feedback_dict


UNDO_COMMENT = "undo of"


def _verdict_row(study: Study, **fields: Any) -> Feedback:
    """A verdict on ``study``, with what the model said of it at the time (its flag, probability
    and version), so that the verdict stays readable after a re-analysis."""
    return Feedback(
        study_uid=study.study_uid,
        flagged=study.flagged,
        probability=study.probability,
        model_name=study.model_name,
        model_version=study.model_version,
        **fields,
    )


class FeedbackLedger(LedgerSessions):
    """Feedback and Segmentation labels."""

    def record_feedback(
        self,
        study_uid: str,
        verdict: str,
        user: str,
        *,
        comment: str | None = None,
        sop_instance_uid: str | None = None,
        mask_key: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Record a radiologist's verdict (confirmed, rejected, known, or corrected with the image
        and the mask's storage key) with who and when."""
        verdict = FeedbackVerdict(verdict).value
        if (verdict == FeedbackVerdict.CORRECTED) != (mask_key is not None):
            raise ValueError("a corrected verdict comes with a mask, and only it")
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            study = session.get(Study, study_uid)
            if study is None:
                raise LedgerError("feedback names a study the ledger does not know")
            row = _verdict_row(
                study,
                verdict=verdict,
                user=user[:64],
                comment=comment[:ERROR_TEXT_LIMIT] if comment else None,
                created_at=now,
                sop_instance_uid=sop_instance_uid,
                mask_key=mask_key,
            )
            session.add(row)
            session.flush()
            return feedback_dict(row)

    def undo_feedback(
        self, study_uid: str, feedback_id: int, user: str, *, now: datetime | None = None
    ) -> dict[str, Any]:
        """Take back the study's newest verdict: only its author, within :data:`UNDO_SECONDS`.

        Nothing is deleted: a new row puts the verdict before it back in force (a copy of it, with
        its outline), or says "undone" when there was none. ValueError (with the reason) when the
        verdict is not the newest, is another user's, is itself an undo, or is too old."""
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            rows = list(
                session.scalars(select(Feedback).where(Feedback.study_uid == study_uid).order_by(Feedback.id.desc()).limit(2))
            )
            if not rows or rows[0].id != feedback_id:
                raise ValueError("only the newest verdict on the study can be undone")
            newest, before = rows[0], (rows[1] if len(rows) > 1 else None)
            if newest.user != user[:64]:
                raise PermissionError(f"the verdict was given by {newest.user}; only they can undo it")
            if newest.verdict == FeedbackVerdict.UNDONE or (newest.comment or "").startswith(UNDO_COMMENT):
                raise ValueError("this verdict is itself an undo")
            if (now - as_utc(newest.created_at)).total_seconds() > UNDO_SECONDS:
                raise ValueError(f"a verdict can be undone within {UNDO_SECONDS} s of giving it")
            study = session.get_one(Study, study_uid)
            restored = before if before is not None and before.verdict != FeedbackVerdict.UNDONE else None
            row = _verdict_row(
                study,
                verdict=restored.verdict if restored else FeedbackVerdict.UNDONE.value,
                user=newest.user,
                comment=f"{UNDO_COMMENT} {newest.verdict}",
                created_at=now,
                sop_instance_uid=restored.sop_instance_uid if restored else None,
                mask_key=restored.mask_key if restored else None,
            )
            session.add(row)
            session.flush()
            return feedback_dict(row)

    def list_feedback(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        """Feedback, oldest first (the last one per study is in force)."""
        with self.reading() as session:
            statement = select(Feedback)
            if study_uid is not None:
                statement = statement.where(Feedback.study_uid == study_uid)
            return [feedback_dict(row) for row in session.scalars(statement.order_by(Feedback.id))]

    def feedback_export(self) -> list[dict[str, Any]]:
        """The feedback in force per study with what retraining needs: each image's stored key and
        the key of the SEG that outlines it, the model's outputs and a label.

        `label` is 1 (pneumothorax) for confirmed, known and corrected, 0 for rejected. Per image,
        `label` is 0 for every image of a rejected study, 1 for the flagged images of a confirmed
        or known study and for the corrected image (whose `mask_key` is the radiologist's outline,
        to be used instead of `seg_key`), and None (not known) for the other images.

        A Segmentation sent back to Pleura (:meth:`record_seg_labels`) is a corrected outline by
        the sending AE: for each image it references, when it is newer than the study's verdict,
        it sets the image's `label` (1, or 0 for an empty outline) and its `seg_key` is the
        received SEG. A study labelled only that way is exported with the verdict "corrected",
        the AE title as `user`, and `label` 1 when any of its images has an outline. `labelled_by`
        says per image whose label it is.
        """
        with self.reading() as session:
            latest = select(func.max(Feedback.id)).group_by(Feedback.study_uid)
            verdicts = {
                row.study_uid: row
                for row in session.scalars(select(Feedback).where(Feedback.id.in_(latest)).order_by(Feedback.id))
                if row.verdict != FeedbackVerdict.UNDONE  # taken back: the study has no verdict
            }
            seg_labels: dict[str, SegLabel] = {}  # the newest per image the ledger holds
            seg_studies: dict[str, list[SegLabel]] = {}
            for label, study_uid in session.execute(
                select(SegLabel, Instance.study_uid)
                .join(Instance, Instance.sop_instance_uid == SegLabel.sop_instance_uid)
                .order_by(SegLabel.id)
            ):
                seg_labels[label.sop_instance_uid] = label
                seg_studies.setdefault(study_uid, []).append(label)
            exported = []
            for study_uid in [*verdicts, *(uid for uid in seg_studies if uid not in verdicts)]:
                row = verdicts.get(study_uid)
                segs = {
                    result.source_sop_instance_uid: result.storage_key
                    for result in session.scalars(
                        select(Result).where(Result.study_uid == study_uid, Result.kind == "SEG")
                    )
                }
                images = []
                for instance in session.scalars(
                    select(Instance)
                    .where(Instance.study_uid == study_uid, Instance.analysis_status != AnalysisStatus.SKIPPED.value)
                    .order_by(Instance.id)
                ):
                    seg_label = seg_labels.get(instance.sop_instance_uid)
                    corrected = row is not None and row.verdict == FeedbackVerdict.CORRECTED
                    seg_key, mask_key = segs.get(instance.sop_instance_uid), None
                    if seg_label is not None and (row is None or seg_label.received_at >= row.created_at):
                        label: int | None = 1 if seg_label.positive else 0
                        seg_key, labelled_by = seg_label.storage_key, seg_label.calling_ae
                    elif row is None:
                        label, labelled_by = None, None
                    else:
                        if corrected:
                            label = 1 if instance.sop_instance_uid == row.sop_instance_uid else None
                            mask_key = row.mask_key if label == 1 else None
                        elif row.verdict != FeedbackVerdict.REJECTED:
                            label = 1 if instance.flagged else None
                        else:
                            label = 0
                        labelled_by = row.user if label is not None else None
                    images.append(
                        {
                            "sop_instance_uid": instance.sop_instance_uid,
                            "series_instance_uid": instance.series_instance_uid,
                            "instance_key": instance.storage_key,
                            "seg_key": seg_key,
                            "analysis_status": instance.analysis_status,
                            "probability": instance.probability,
                            "flagged": instance.flagged,
                            "area_px": instance.area_px,
                            "mask_key": mask_key,
                            "label": label,
                            "labelled_by": labelled_by,
                        }
                    )
                outlined = any(image["label"] == 1 for image in images)
                if row is not None:
                    entry = feedback_dict(row)
                    entry.pop("id")
                    entry["label"] = 1 if row.verdict != FeedbackVerdict.REJECTED or outlined else 0
                else:
                    newest = seg_studies[study_uid][-1]
                    study = session.get_one(Study, study_uid)
                    entry = {
                        "study_uid": study_uid,
                        "verdict": FeedbackVerdict.CORRECTED.value,
                        "user": newest.calling_ae,
                        "comment": f"Segmentation {newest.seg_sop_instance_uid} sent back by {newest.calling_ae}",
                        "created_at": newest.received_at,
                        "sop_instance_uid": newest.sop_instance_uid,
                        "mask_key": None,
                        "flagged": study.flagged,
                        "probability": study.probability,
                        "model_name": study.model_name,
                        "model_version": study.model_version,
                        "label": 1 if outlined else 0,
                    }
                entry["images"] = images
                exported.append(entry)
            return exported

    def has_seg_labels(self, seg_sop_instance_uid: str) -> bool:
        with self.reading() as session:
            found = session.scalar(select(SegLabel.id).where(SegLabel.seg_sop_instance_uid == seg_sop_instance_uid))
            return found is not None

    def record_seg_labels(
        self,
        *,
        seg_sop_instance_uid: str,
        seg_study_uid: str,
        storage_key: str,
        calling_ae: str,
        labels: Sequence[tuple[str, bool]],
        received_at: datetime | None = None,
    ) -> bool:
        """Record a received Segmentation as a label per image it references (``(SOP Instance UID,
        positive)``); False when that SEG was already recorded. It never touches the studies'
        analysis: a SEG is not analysed, and the images it labels need not be here yet."""
        now = as_utc(received_at) if received_at else utcnow()
        try:
            with self._transaction() as session:
                known = session.scalar(select(SegLabel.id).where(SegLabel.seg_sop_instance_uid == seg_sop_instance_uid))
                if known is not None:
                    return False
                for sop_instance_uid, positive in labels:
                    session.add(
                        SegLabel(
                            seg_sop_instance_uid=seg_sop_instance_uid,
                            seg_study_uid=seg_study_uid,
                            sop_instance_uid=sop_instance_uid,
                            storage_key=storage_key,
                            positive=bool(positive),
                            calling_ae=calling_ae.strip()[:16],
                            received_at=now,
                        )
                    )
            return True
        except IntegrityError:  # another association recorded the same SEG at the same moment
            return False
