"""Notifications: the flag in force announced once per change, the outbox of HL7 and webhook
messages, and their attempts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from node.ledger.schema import (
    ERROR_TEXT_LIMIT,
    Feedback,
    Instance,
    LedgerError,
    Notification,
    NotificationState,
    OutboxStatus,
    Study,
    as_utc,
    utcnow,
)
from node.ledger.sessions import LedgerSessions, serialise
from node.ledger.views import NotificationView, feedback_dict, flag_in_force, notification_view, refs_for, study_dict


NOTIFY_LOCK_KEY = 0x504C4E54  # "PLNT": one node at a time looks for flag changes to announce


class NotificationLedger(LedgerSessions):
    """Flag notifications and their outbox."""

    def enqueue_flag_notifications(
        self,
        build: Callable[[dict[str, Any], str], list[dict[str, Any]]],
        *,
        report: Callable[[dict[str, Any], str], list[dict[str, Any]]] | None = None,
        now: datetime | None = None,
        first_look_within_seconds: float = 86400.0,
    ) -> list[int]:
        """Create notification rows for every analysed study whose flag in force changed since it
        was last announced: `build(study, event)` ("flagged" or "withdrawn") returns the messages,
        each ``{"channel", "target", "payload", "max_attempts"}``. Returns the new rows' ids.

        `report(study, status)`, when given, returns the messages that report every analysis and
        every change of its finding (the FHIR DiagnosticReport, channel ``fhir``): ``final`` for the
        first, ``amended`` after a new analysis, ``corrected`` after a verdict that changed the
        flag in force; their rows' event is that status.

        A study is looked at again only when its analysis or its feedback changed, and the rows
        and the announced state are written in one transaction, so each change is announced once.
        A study seen for the first time more than `first_look_within_seconds` after its analysis
        (a ledger from before notifications existed) is recorded without being announced. Nodes
        sharing a PostgreSQL ledger take turns (an advisory lock for the transaction).
        """
        now = as_utc(now) if now else utcnow()
        created: list[int] = []
        with self._transaction() as session:
            # Several nodes on one ledger each run this loop: one look at a time, or two could both
            # find a change unannounced (SQLite's BEGIN IMMEDIATE serialises it already).
            serialise(session, NOTIFY_LOCK_KEY)
            latest = (
                select(Feedback.study_uid.label("study_uid"), func.max(Feedback.id).label("id"))
                .group_by(Feedback.study_uid)
                .subquery()
            )
            rows = session.execute(
                select(Study, NotificationState, Feedback)
                .outerjoin(NotificationState, NotificationState.study_uid == Study.study_uid)
                .outerjoin(latest, latest.c.study_uid == Study.study_uid)
                .outerjoin(Feedback, Feedback.id == latest.c.id)
                .where(
                    Study.analysed_at.is_not(None),
                    or_(
                        NotificationState.study_uid.is_(None),
                        NotificationState.analysed_at.is_(None),
                        NotificationState.analysed_at != Study.analysed_at,
                        func.coalesce(latest.c.id, 0) != NotificationState.feedback_id,
                    ),
                )
                .order_by(Study.analysed_at)
            ).all()
            if not rows:
                return created
            refs = refs_for(session, [study.study_uid for study, _, _ in rows])
            for study, state, feedback in rows:
                verdict = feedback.verdict if feedback is not None else None
                flagged = flag_in_force(study.flagged, verdict)
                announced = bool(state.flagged) if state is not None else False
                stale = state is None and study.analysed_at < now - timedelta(seconds=first_look_within_seconds)
                if flagged != announced and not stale:
                    event = "flagged" if flagged else "withdrawn"
                    info = self._notification_info(session, study, refs[study.study_uid], feedback)
                    # A decision announced before and now changed (a re-analysis, a verdict): the
                    # message corrects the earlier one.
                    info["correction"] = (
                        session.scalar(select(Notification.id).where(Notification.study_uid == study.study_uid).limit(1))
                        is not None
                    )
                    created += self._add_messages(session, study.study_uid, event, build(info, event), now)
                new_analysis = state is None or state.analysed_at != study.analysed_at
                if report is not None and not stale and (new_analysis or flagged != announced):
                    reported = session.scalar(
                        select(Notification.id)
                        .where(Notification.study_uid == study.study_uid, Notification.channel == "fhir")
                        .limit(1)
                    )
                    status = "final" if reported is None else "amended" if new_analysis else "corrected"
                    info = self._notification_info(session, study, refs[study.study_uid], feedback)
                    info["flag_in_force"] = flagged
                    created += self._add_messages(session, study.study_uid, status, report(info, status), now)
                if state is None:
                    state = NotificationState(study_uid=study.study_uid)
                    session.add(state)
                state.flagged = flagged
                state.analysed_at = study.analysed_at
                state.feedback_id = feedback.id if feedback is not None else 0
                state.checked_at = now
        return created

    @staticmethod
    def _add_messages(
        session: Session, study_uid: str, event: str, messages: list[dict[str, Any]], now: datetime
    ) -> list[int]:
        created = []
        for message in messages:
            row = Notification(
                study_uid=study_uid,
                event=event,
                channel=str(message["channel"]),
                target=str(message["target"])[:300],
                payload=str(message["payload"]),
                status=OutboxStatus.PENDING.value,
                attempts=0,
                max_attempts=int(message.get("max_attempts", 10)),
                next_attempt_at=now,
                created_at=now,
            )
            session.add(row)
            session.flush()
            created.append(row.id)
        return created

    @staticmethod
    def _notification_info(session: Session, study: Study, ref: str, feedback: Feedback | None) -> dict[str, Any]:
        instances = session.scalars(select(Instance).where(Instance.study_uid == study.study_uid)).all()
        flagged = [i for i in instances if i.flagged]
        info = study_dict(
            study,
            len(instances),
            max((i.area_px for i in flagged if i.area_px is not None), default=None),
            max((i.area_cm2 for i in flagged if i.area_cm2 is not None), default=None),
        )
        info["ref"] = ref
        info["feedback"] = feedback_dict(feedback) if feedback is not None else None
        info["images"] = [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "probability": i.probability,
                "flagged": i.flagged,
                "area_px": i.area_px,
                "area_cm2": i.area_cm2,
                # Filled once the analysis reports them (side and pleural gap, from the result writers).
                "side": getattr(i, "side", None),
                "largest_gap_mm": getattr(i, "gap_mm", None),
                "reason": i.analysis_reason,
            }
            for i in instances
        ]
        return info

    def due_notifications(self, *, now: datetime | None = None, limit: int = 100) -> list[int]:
        now = as_utc(now) if now else utcnow()
        with self.reading() as session:
            return list(
                session.scalars(
                    select(Notification.id)
                    .where(Notification.status == OutboxStatus.PENDING.value, Notification.next_attempt_at <= now)
                    .order_by(Notification.id)
                    .limit(limit)
                )
            )

    def claim_notification(
        self, notification_id: int, *, now: datetime | None = None, lease_seconds: float = 300.0
    ) -> NotificationView | None:
        """Take a pending, due row for one attempt (moving its next attempt `lease_seconds` ahead),
        or None when it is not to be tried now."""
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = session.get(Notification, notification_id, with_for_update=True)
            if row is None or row.status != OutboxStatus.PENDING:
                return None
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                return None
            row.next_attempt_at = now + timedelta(seconds=lease_seconds)
            return notification_view(row)

    def record_notification_sent(
        self, notification_id: int, response: str | None, *, now: datetime | None = None
    ) -> NotificationView:
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = self._notification_row(session, notification_id)
            row.status = OutboxStatus.SENT.value
            row.attempts += 1
            row.last_attempt_at = row.sent_at = now
            row.next_attempt_at = None
            row.last_error = None
            row.response = response[:ERROR_TEXT_LIMIT] if response else None
            return notification_view(row)

    def record_notification_failure(
        self, notification_id: int, error: str, *, retry_seconds: float, now: datetime | None = None
    ) -> NotificationView:
        """Count a failed attempt: try again after `retry_seconds` (doubling each time, at most an
        hour) or, at the row's max_attempts, mark it failed."""
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = self._notification_row(session, notification_id)
            row.attempts += 1
            row.last_attempt_at = now
            row.last_error = error[:ERROR_TEXT_LIMIT]
            if row.attempts >= row.max_attempts:
                row.status = OutboxStatus.FAILED.value
                row.next_attempt_at = None
            else:
                delay = min(retry_seconds * 2 ** (row.attempts - 1), 3600.0)
                row.next_attempt_at = now + timedelta(seconds=delay)
            return notification_view(row)

    def record_notification_rejected(
        self, notification_id: int, error: str, response: str | None, *, now: datetime | None = None
    ) -> NotificationView:
        """The receiver refused the message for good (HL7 AR): rejected, never tried again, with
        its reason and answer kept for the worklist."""
        now = as_utc(now) if now else utcnow()
        with self._transaction() as session:
            row = self._notification_row(session, notification_id)
            row.status = OutboxStatus.REJECTED.value
            row.attempts += 1
            row.last_attempt_at = now
            row.next_attempt_at = None
            row.last_error = error[:ERROR_TEXT_LIMIT]
            row.response = response[:ERROR_TEXT_LIMIT] if response else None
            return notification_view(row)

    def list_notifications(self, study_uid: str | None = None, *, limit: int = 500) -> list[NotificationView]:
        """Notifications, newest first."""
        with self.reading() as session:
            statement = select(Notification)
            if study_uid is not None:
                statement = statement.where(Notification.study_uid == study_uid)
            rows = session.scalars(statement.order_by(Notification.id.desc()).limit(limit))
            return [notification_view(row) for row in rows]

    @staticmethod
    def _notification_row(session: Session, notification_id: int) -> Notification:
        row = session.get(Notification, notification_id)
        if row is None:
            raise LedgerError(f"notification {notification_id} does not exist")
        return row
