"""The ledger: where every received instance, study, result and delivery stands, and why.

SQLAlchemy 2.0 on SQLite (the default) or PostgreSQL. The interface is :class:`Ledger` and the
names below; the modules behind it:

- :mod:`node.ledger.schema` — the tables and their statuses;
- :mod:`node.ledger.sessions` — engine, SQLite locking, PostgreSQL schema creation, transactions;
- :mod:`node.ledger.studies` — instances and studies: receiving, settling, dispatch;
- :mod:`node.ledger.leases` — running analyses' heartbeat leases, taken back when they lapse;
- :mod:`node.ledger.results` — a worker's analysis, results and their outbox;
- :mod:`node.ledger.feedback` — radiologists' feedback, Segmentation labels, the feedback export;
- :mod:`node.ledger.notifications` — flag notifications and their outbox;
- :mod:`node.ledger.logins` — worklist log-in sessions;
- :mod:`node.ledger.migrations` — the schema's revisions (Alembic), checked at every open;
- :mod:`node.ledger.views` — the snapshots handed out (dataclasses) and the reads that build them;
- :mod:`node.ledger.facade` — :class:`Ledger`, all of the above as one object.
"""

from node.ledger.facade import Ledger
from node.ledger.results import SummaryError
from node.ledger.schema import (
    AnalysisStart,
    AnalysisStatus,
    Association,
    Base,
    Feedback,
    FeedbackVerdict,
    Held,
    Instance,
    LedgerError,
    LoginSession,
    Notification,
    NotificationState,
    OutboxEntry,
    OutboxStatus,
    Result,
    SegLabel,
    Study,
    StudyRef,
    StudyStatus,
    UNDO_SECONDS,
    utcnow,
)
from node.ledger.views import (
    DueStudy,
    InstanceView,
    NotificationView,
    OutboxView,
    ResultView,
    flag_in_force,
    study_ref_for,
)

__all__ = [
    "AnalysisStart",
    "AnalysisStatus",
    "Association",
    "Base",
    "DueStudy",
    "Feedback",
    "FeedbackVerdict",
    "Held",
    "Instance",
    "InstanceView",
    "Ledger",
    "LedgerError",
    "LoginSession",
    "Notification",
    "NotificationState",
    "NotificationView",
    "OutboxEntry",
    "OutboxStatus",
    "OutboxView",
    "Result",
    "ResultView",
    "SegLabel",
    "Study",
    "StudyRef",
    "StudyStatus",
    "SummaryError",
    "UNDO_SECONDS",
    "flag_in_force",
    "study_ref_for",
    "utcnow",
]
