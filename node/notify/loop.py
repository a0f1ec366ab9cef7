"""The notification outbox: find flag changes, build the messages, deliver them with retries.

Besides the flag's HL7 and webhook messages, each analysis (and each change of its finding) is
reported to the FHIR server when one is configured (``node/notify/fhir.py``).

Each round (a :class:`~node.periodic.PeriodicTask` in the node) first asks the ledger for studies
whose flag in force changed since it was last announced and stores one message per target (the
exact bytes that will be sent), then attempts every due message. A failed attempt is retried after
``notify_retry_seconds``, doubling, up to the target's ``max_attempts`` (an HL7 AE among them); an
HL7 AR (application reject) is final: the row is marked rejected at once. Every attempt, the answer
(the HL7 ACK, the HTTP status) and the last error stay in the ledger's ``notifications`` table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from config.settings import Settings
from node.ledger import Ledger, NotificationView, utcnow
from node.notify.fhir import FhirError, FhirRejected, build_report_bundle, post_bundle
from node.notify.hl7 import MllpError, MllpRejected, build_oru, send_mllp
from node.notify.webhook import WebhookError, post_webhook, webhook_body
from node.periodic import PeriodicTask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    notification_id: int
    sent: bool
    detail: str


class Notifier:
    """Builds and sends the notifications the settings ask for."""

    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger

    @property
    def enabled(self) -> bool:
        return bool(self.settings.hl7_destinations or self.settings.webhooks or self.settings.fhir)

    def report(self, study: dict[str, Any], status: str) -> list[dict[str, Any]]:
        """The FHIR transaction Bundle of an analysis (or of its correction), when a FHIR server is
        configured."""
        endpoint = self.settings.fhir
        if endpoint is None:
            return []
        payload = build_report_bundle(study, endpoint, status)
        return [{"channel": "fhir", "target": endpoint.label, "payload": payload, "max_attempts": endpoint.max_attempts}]

    def build(self, study: dict[str, Any], event: str, now: datetime | None = None) -> list[dict[str, Any]]:
        now = now or utcnow()
        messages: list[dict[str, Any]] = []
        for destination in self.settings.hl7_destinations:
            payload = build_oru(
                study,
                event,
                destination,
                sending_application=self.settings.hl7_sending_application,
                sending_facility=self.settings.hl7_sending_facility,
                now=now,
            )
            messages.append(
                {"channel": "hl7", "target": destination.label, "payload": payload, "max_attempts": destination.max_attempts}
            )
        if self.settings.webhooks:
            body = webhook_body(study, event, now=now)
            for webhook in self.settings.webhooks:
                messages.append(
                    {"channel": "webhook", "target": webhook.url, "payload": body, "max_attempts": webhook.max_attempts}
                )
        return messages

    def enqueue_changes(self, now: datetime | None = None) -> list[int]:
        """Store the messages for every flag change; returns their ids."""
        created = self.ledger.enqueue_flag_notifications(
            lambda study, event: self.build(study, event, now),
            report=self.report if self.settings.fhir is not None else None,
            now=now,
        )
        if created:
            log.info("queued %d notification(s)", len(created))
        return created

    def deliver(self, notification_id: int, now: datetime | None = None) -> Attempt | None:
        """One attempt at one due message; None when it is not due (or taken by someone else)."""
        row = self.ledger.claim_notification(notification_id, now=now)
        if row is None:
            return None
        try:
            response = self._send(row)
        except (MllpRejected, FhirRejected) as exc:
            # Application reject (HL7 AR, FHIR 4xx): the receiver will never take this message;
            # retrying changes nothing.
            self.ledger.record_notification_rejected(row.id, str(exc), exc.ack, now=now)
            log.warning("notification %d (%s %s to %s) rejected, not retried: %s", row.id, row.channel, row.event,
                        row.target, exc)
            return Attempt(row.id, False, str(exc))
        except (MllpError, WebhookError, FhirError, LookupError) as exc:
            failed = self.ledger.record_notification_failure(
                row.id, str(exc), retry_seconds=self.settings.notify_retry_seconds, now=now
            )
            # The log names the notification and its target, never the patient or the study UID.
            log.warning(
                "notification %d (%s %s to %s) attempt %d failed: %s%s",
                row.id,
                row.channel,
                row.event,
                row.target,
                failed.attempts,
                exc,
                "; giving up" if failed.status == "failed" else "",
            )
            return Attempt(row.id, False, str(exc))
        self.ledger.record_notification_sent(row.id, response, now=now)
        log.info("notification %d (%s %s) sent to %s", row.id, row.channel, row.event, row.target)
        return Attempt(row.id, True, response)

    def _send(self, row: NotificationView) -> str:
        if row.channel == "hl7":
            destination = next((d for d in self.settings.hl7_destinations if d.label == row.target), None)
            if destination is None:
                raise LookupError(f"{row.target} is no longer among PLEURA_HL7_DESTINATIONS")
            return send_mllp(destination, row.payload)
        if row.channel == "webhook":
            webhook = next((w for w in self.settings.webhooks if w.url == row.target), None)
            if webhook is None:
                raise LookupError(f"{row.target} is no longer among PLEURA_WEBHOOKS")
            return post_webhook(webhook, row.payload, row.event)
        if row.channel == "fhir":
            endpoint = self.settings.fhir
            if endpoint is None or endpoint.label != row.target:
                raise LookupError(f"{row.target} is no longer PLEURA_FHIR's url")
            return post_bundle(endpoint, row.payload)
        raise LookupError(f"unknown notification channel {row.channel!r}")

    def run_once(self, now: datetime | None = None) -> list[Attempt]:
        self.enqueue_changes(now)
        attempts = []
        for notification_id in self.ledger.due_notifications(now=now):
            attempt = self.deliver(notification_id, now)
            if attempt is not None:
                attempts.append(attempt)
        return attempts


class NotificationLoop(PeriodicTask):
    """Runs :meth:`Notifier.run_once` every `interval_seconds` in the node."""

    thread_name = "pleura-notify"

    def __init__(self, notifier: Notifier, *, interval_seconds: float = 2.0) -> None:
        super().__init__(interval_seconds)
        self.notifier = notifier

    def run_once(self) -> list[Attempt]:
        return self.notifier.run_once()
